"""Qieemo baseline (Chen et al. 2025, "Qieemo: Speech Is All You Need in the Emotion Recognition in
Conversations", arXiv:2503.22687): audio only, built on a pretrained ASR encoder.

The paper's idea: an ASR encoder already holds, frame-aligned, both emotion-bearing acoustics (best in
its middle blocks) and what is being said (its phonetic posteriorgram, PPG). A multimodal fusion (MMF)
module and cross-modal attention (CMA) fuse the two, and a pooled classifier predicts the emotion.

Our implementation (what this file computes, not a re-run of the authors' code):

* ASR encoder: any HF audio encoder through `SpeechEncoder` (default and intended: the Whisper encoder,
  frozen, without Whisper's 30 s padding). ``feature_layer`` picks the middle hidden state
  (0 = embeddings; default: half the encoder's depth).
* PPG: ``softmax(Linear(final_layer))`` over ``ppg_dim`` classes. **An approximation**: the paper reads
  the PPG off the ASR model's own CTC phone/token classifier; the Whisper encoder has no CTC head, so
  here the PPG head is a *trainable* linear projection of the final encoder layer, learned from the
  emotion loss alone. It is a soft, frame-aligned bottleneck over the encoder's most linguistic layer,
  not a phone posterior; with an encoder that has a CTC head, load that head's weights into
  ``ppg_head`` (same shape: ``[ppg_dim, hidden]``) and freeze it to get the paper's PPG.
* MMF: both streams projected to ``hidden_size``; a gated fusion ``g * a + (1 - g) * p`` with
  ``g = sigmoid(W [a; p])``; CMA = two `nn.MultiheadAttention` blocks (features attend to the PPG
  stream and the PPG stream to the features, padded frames masked as keys), residual + LayerNorm;
  the attended streams are projected back and added to the gated fusion.
* Masked mean pooling over valid frames, dropout + linear classifier, and a projection head whose
  output feeds SupCon. Loss: MAL (focal + optional SupCon) with `model.loss_config`, as EmoQ stage 1.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from ..emoq.configuration_emoq import audio_hidden_size
from ..speech_encoder import SpeechEncoder, load_audio_encoder
from .common import (
    BaselineOutput,
    BaselinePreTrainedModel,
    contrastive_head,
    masked_mean,
    num_labels_of,
    reject_cached_frames,
)


def encoder_depth(audio_config: PreTrainedConfig) -> int:
    """Number of transformer blocks of an audio encoder (Whisper calls it encoder_layers)."""
    if audio_config.model_type == "whisper":
        return audio_config.encoder_layers
    return audio_config.num_hidden_layers


class QieemoConfig(PreTrainedConfig):
    """Config of QieemoForEmotionClassification.

    feature_layer: encoder hidden state used as the emotion features (0 = embeddings, L = last block,
        negative = counted from the end); None = the middle block (L // 2), resolved when the config is built.
    ppg_dim: number of PPG classes (width of the PPG head over the final encoder layer).
    hidden_size / num_attention_heads: width and heads of the MMF + cross-modal attention.
    """

    model_type = "qieemo"
    sub_configs_defaults = {"audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper")}

    audio_config: dict | PreTrainedConfig | None = None
    feature_layer: int | None = None
    ppg_dim: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    dropout: float = 0.1
    classifier_dropout: float = 0.1
    contrastive_dim: int = 128
    freeze_encoder: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        depth = encoder_depth(self.audio_config)
        if self.feature_layer is None:
            self.feature_layer = depth // 2
        if not -(depth + 1) <= self.feature_layer <= depth:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for an encoder of {depth} layers")
        self.feature_layer = self.feature_layer % (depth + 1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.ppg_dim < 1:
            raise ValueError(f"ppg_dim must be >= 1, got {self.ppg_dim}")


class _FeatureAndFinalLayer(SpeechEncoder):
    """`SpeechEncoder` returning [middle layer ; final layer] concatenated on the feature axis.

    One encoder pass, the wrapper's padding handling (bs=1 == bs=N, Whisper without 30 s padding) kept;
    only the layer selection differs, so it overrides `_select`. Split with `split_sizes`.
    """

    def __init__(self, config: PreTrainedConfig, feature_layer: int, frozen: bool):
        super().__init__(config, layers=[], frozen=frozen)
        self.feature_layer = feature_layer

    def _select(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([hidden_states[self.feature_layer], hidden_states[-1]], dim=-1)


class MultimodalFusion(nn.Module):
    """MMF (gated fusion) + CMA (cross-modal attention both ways) over two frame-aligned streams."""

    def __init__(self, feature_dim: int, ppg_dim: int, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        self.ppg_proj = nn.Linear(ppg_dim, hidden_size)
        self.gate = nn.Linear(2 * hidden_size, hidden_size)
        self.feature_to_ppg = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.ppg_to_feature = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.feature_norm = nn.LayerNorm(hidden_size)
        self.ppg_norm = nn.LayerNorm(hidden_size)
        self.out_proj = nn.Linear(2 * hidden_size, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, ppg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features [B, T, Df], ppg [B, T, P], mask [B, T] bool (True = valid) -> fused frames [B, T, H]."""
        a, p = self.feature_proj(features), self.ppg_proj(ppg)
        g = torch.sigmoid(self.gate(torch.cat([a, p], dim=-1)))
        fused = g * a + (1.0 - g) * p
        padding = ~mask
        a2p, _ = self.feature_to_ppg(a, p, p, key_padding_mask=padding, need_weights=False)
        p2a, _ = self.ppg_to_feature(p, a, a, key_padding_mask=padding, need_weights=False)
        a = self.feature_norm(a + self.dropout(a2p))
        p = self.ppg_norm(p + self.dropout(p2a))
        return self.out_norm(fused + self.dropout(self.out_proj(torch.cat([a, p], dim=-1))))


class QieemoForEmotionClassification(BaselinePreTrainedModel):
    """Whisper (any ASR) encoder -> [middle-layer features, PPG] -> MMF + CMA -> masked mean -> classifier."""

    config_class = QieemoConfig
    base_model_prefix = "qieemo"
    _keep_in_fp32_modules_strict = ["fusion", "ppg_head", "classifier", "contrastive_head"]

    def __init__(self, config: QieemoConfig, audio_encoder: nn.Module | None = None):
        super().__init__(config)
        self.speech_encoder = _FeatureAndFinalLayer(
            config.audio_config, config.feature_layer, frozen=config.freeze_encoder
        )
        if audio_encoder is not None:
            self.speech_encoder.encoder = audio_encoder.requires_grad_(not config.freeze_encoder)
        hidden = audio_hidden_size(config.audio_config)
        self.ppg_head = nn.Linear(hidden, config.ppg_dim)
        self.fusion = MultimodalFusion(
            hidden, config.ppg_dim, config.hidden_size, config.num_attention_heads, config.dropout
        )
        self.classifier = nn.Sequential(
            nn.Dropout(config.classifier_dropout), nn.Linear(config.hidden_size, num_labels_of(config))
        )
        self.contrastive_head = contrastive_head(config.hidden_size, config.contrastive_dim)
        self._setup_loss_config()
        self.post_init()

    @classmethod
    def from_components(
        cls, encoder: str, *, id2label: dict[int, str], dtype: torch.dtype | None = None, **config_kwargs
    ) -> QieemoForEmotionClassification:
        """A fresh model around a pretrained ASR encoder (hub id, local folder or ``builtin:whisper-tiny.en``)."""
        from ...hub import resolve_model

        ref = resolve_model(encoder)
        config = QieemoConfig(
            audio_config=AutoConfig.from_pretrained(ref),
            id2label=dict(id2label),
            label2id={v: k for k, v in id2label.items()},
            **config_kwargs,
        )
        audio_encoder = load_audio_encoder(ref, **({"dtype": dtype} if dtype is not None else {}))
        return cls(config, audio_encoder=audio_encoder)

    def encode(
        self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(middle-layer features [B, T, H], PPG [B, T, ppg_dim] (rows sum to 1), frame mask [B, T] bool)."""
        frames, mask = self.speech_encoder(input_features, feature_attention_mask)
        frames = frames.to(self.head_dtype)
        features, final = frames.split(frames.shape[-1] // 2, dim=-1)
        ppg = torch.softmax(self.ppg_head(final), dim=-1)
        return features, ppg, mask

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        emotion_labels: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        mocap: torch.Tensor | None = None,
        mocap_mask: torch.Tensor | None = None,
        **ignored,
    ) -> BaselineOutput:
        """Audio only: text and mocap inputs are accepted (shared batches) and not used."""
        reject_cached_frames("Qieemo (middle layer + PPG from the final layer)", ignored)
        if input_features is None:
            raise ValueError("Qieemo needs input_features")
        features, ppg, mask = self.encode(input_features, feature_attention_mask)
        pooled = masked_mean(self.fusion(features, ppg, mask), mask)
        return self.output(pooled, emotion_labels)

__all__ = ["MultimodalFusion", "QieemoConfig", "QieemoForEmotionClassification"]
