"""EmoQ and the two baseline systems (Qieemo, Patamia et al. 2023), each with its configuration, model and
processor side by side; importing this package registers them with the transformers Auto classes
(AutoConfig, AutoModel, AutoProcessor), which `import emoq` arranges as soon as transformers loads."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .baselines import (
    BaselineAudioProcessor,
    BaselineProcessor,
    PatamiaConfig,
    PatamiaForEmotionClassification,
    QieemoConfig,
    QieemoForEmotionClassification,
)
from .emoq import (
    PLACEHOLDER_TOKEN,
    EmoQConfig,
    EmoQForConditionalGeneration,
    EmoQFormerConfig,
    EmoQOutput,
    EmoQProcessor,
    PlaceholderCountError,
)

AutoConfig.register(EmoQFormerConfig.model_type, EmoQFormerConfig, exist_ok=True)
for _config, _model, _processor in (
    (EmoQConfig, EmoQForConditionalGeneration, EmoQProcessor),
    (QieemoConfig, QieemoForEmotionClassification, BaselineAudioProcessor),
    (PatamiaConfig, PatamiaForEmotionClassification, BaselineProcessor),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoProcessor.register(_config, _processor, exist_ok=True)

__all__ = [
    "PLACEHOLDER_TOKEN",
    "BaselineAudioProcessor",
    "BaselineProcessor",
    "EmoQConfig",
    "EmoQFormerConfig",
    "EmoQForConditionalGeneration",
    "EmoQOutput",
    "EmoQProcessor",
    "PatamiaConfig",
    "PatamiaForEmotionClassification",
    "PlaceholderCountError",
    "QieemoConfig",
    "QieemoForEmotionClassification",
]
