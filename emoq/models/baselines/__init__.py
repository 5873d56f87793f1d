"""The published baselines, trained and scored the way EmoQ is: Qieemo (audio only) and Patamia et al. 2023
(audio + text + optional motion capture). Both classify; neither chats."""

from .patamia import PatamiaConfig, PatamiaForEmotionClassification
from .processing_baseline import BaselineAudioProcessor, BaselineProcessor
from .qieemo import QieemoConfig, QieemoForEmotionClassification

__all__ = [
    "BaselineAudioProcessor",
    "BaselineProcessor",
    "PatamiaConfig",
    "PatamiaForEmotionClassification",
    "QieemoConfig",
    "QieemoForEmotionClassification",
]
