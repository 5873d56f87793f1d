"""emoq: LLM-centric speech emotion recognition (EmoQ-Former soft prompts into LoRA LLMs)."""

__version__ = "0.1.0"
