"""EmoQ and the two baseline systems (Qieemo, Patamia et al. 2023), each with its configuration, model and
processor side by side; importing this package registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel

from .baselines import (
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

AutoConfig.register(EmoQConfig.model_type, EmoQConfig, exist_ok=True)
AutoConfig.register(EmoQFormerConfig.model_type, EmoQFormerConfig, exist_ok=True)
AutoModel.register(EmoQConfig, EmoQForConditionalGeneration, exist_ok=True)

__all__ = [
    "PLACEHOLDER_TOKEN",
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
