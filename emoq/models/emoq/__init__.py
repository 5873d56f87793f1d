"""EmoQ: speech encoder -> EmoQ-Former -> projector -> soft prompts in a LoRA-tuned causal LLM."""

from .configuration_emoq import PLACEHOLDER_TOKEN, EmoQConfig, EmoQFormerConfig
from .modeling_emoq import EmoQForConditionalGeneration, EmoQOutput, PlaceholderCountError
from .processing_emoq import EmoQProcessor

__all__ = [
    "PLACEHOLDER_TOKEN",
    "EmoQConfig",
    "EmoQFormerConfig",
    "EmoQForConditionalGeneration",
    "EmoQOutput",
    "EmoQProcessor",
    "PlaceholderCountError",
]
