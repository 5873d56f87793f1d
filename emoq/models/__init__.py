"""EmoQ and the two baseline systems (Qieemo, Patamia et al. 2023), registered with the transformers
Auto classes on import."""

from transformers import AutoConfig, AutoModel

from .configuration_emoq import PLACEHOLDER_TOKEN, EmoQConfig, EmoQFormerConfig
from .modeling_emoq import EmoQForConditionalGeneration, EmoQOutput, LossWeights, PlaceholderCountError
from .patamia import PatamiaConfig, PatamiaForEmotionClassification
from .qieemo import QieemoConfig, QieemoForEmotionClassification

AutoConfig.register(EmoQConfig.model_type, EmoQConfig, exist_ok=True)
AutoConfig.register(EmoQFormerConfig.model_type, EmoQFormerConfig, exist_ok=True)
AutoModel.register(EmoQConfig, EmoQForConditionalGeneration, exist_ok=True)

__all__ = [
    "PLACEHOLDER_TOKEN",
    "EmoQConfig",
    "EmoQFormerConfig",
    "EmoQForConditionalGeneration",
    "EmoQOutput",
    "LossWeights",
    "PatamiaConfig",
    "PatamiaForEmotionClassification",
    "PlaceholderCountError",
    "QieemoConfig",
    "QieemoForEmotionClassification",
]
