"""Patamia et al. 2023 baseline ("Multimodal Speech Emotion Recognition Using Modality-specific
Self-Supervised Frameworks", IEEE SMC 2023, arXiv:2312.01568): wav2vec2 audio + BERT text (+ motion capture),
feature-level fusion.

Our implementation (what this file computes, not a re-run of the authors' code):

* audio: any HF wav2vec2-family encoder through `SpeechEncoder` (frozen by default; ``audio_layers``
  selects or mixes hidden states as for EmoQ), masked mean over valid frames;
* text: any HF BERT-style encoder (``text_config``; the toolkit default is ``builtin:all-minilm-l6-v2``
  via `from_components`), masked mean of the last hidden states over real tokens (frozen by default);
  ``text_config=None`` builds an audio (+ mocap) model;
* motion capture (optional, ``mocap_dim > 0``): a float tensor [B, T_mocap, mocap_dim] with a mask,
  encoded per frame by a bidirectional GRU (``mocap_encoder="gru"``, packed so padding is never seen)
  or an MLP (``"mlp"``), masked mean;
* fusion: each pooled vector is layer-normalised (so a frozen encoder's scale cannot drown the others),
  the vectors are concatenated, and an MLP (Linear-GELU-Dropout x2) gives the fused vector that feeds
  the classifier and the SupCon projection head.

A modality the model has but a sample lacks (``text_input_ids``/``mocap`` not given, or a row whose
mask is all zero) is replaced by a learned "missing" vector, per sample — so one model serves batches
with and without transcripts or mocap, and bs=1 equals bs=N either way. A modality given to a model
that has no branch for it is an error, never silently dropped. Label set of their protocol:
``iemocap_patamia4`` (angry, excited, neutral, sad; Sessions 1-4 train / 5 test).

Text ids must come from the text encoder's own tokenizer (``text_input_ids``); the EmoQ collator's
``transcript_ids`` are the LLM tokenizer's ids and are ignored here (with a warning).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.utils import logging

from ..emoq.configuration_emoq import audio_hidden_size
from ..speech_encoder import SpeechEncoder, load_audio_encoder
from .common import (
    BaselineOutput,
    BaselinePreTrainedModel,
    contrastive_head,
    masked_mean,
    num_labels_of,
)

logger = logging.get_logger(__name__)

DEFAULT_TEXT_ENCODER = "builtin:all-minilm-l6-v2"
MOCAP_ENCODERS = ("gru", "mlp")


class PatamiaConfig(PreTrainedConfig):
    """Config of PatamiaForEmotionClassification.

    audio_layers: encoder hidden states used ([] = last layer; see `SpeechEncoder`).
    text_config: the BERT-style text encoder's config; None = no text branch.
    mocap_dim: features per motion-capture frame; 0 = no mocap branch.
    mocap_encoder: "gru" (bidirectional, mocap_hidden_size wide in total) or "mlp".
    fusion_hidden_size / fusion_dropout: width and dropout of the fusion MLP.
    """

    model_type = "patamia"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="wav2vec2"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
    }

    audio_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    audio_layers: list[int] | None = None
    mocap_dim: int = 0
    mocap_encoder: str = "gru"
    mocap_hidden_size: int = 128
    fusion_hidden_size: int = 256
    fusion_dropout: float = 0.2
    contrastive_dim: int = 128
    freeze_encoder: bool = True
    freeze_text_encoder: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.audio_layers = list(self.audio_layers or [])
        if self.mocap_encoder not in MOCAP_ENCODERS:
            raise ValueError(f"mocap_encoder must be one of {MOCAP_ENCODERS}, got {self.mocap_encoder!r}")
        if self.mocap_dim < 0:
            raise ValueError(f"mocap_dim must be >= 0 (0 = no mocap branch), got {self.mocap_dim}")
        if self.mocap_dim and self.mocap_encoder == "gru" and self.mocap_hidden_size % 2:
            raise ValueError(f"mocap_hidden_size must be even for a bidirectional GRU, got {self.mocap_hidden_size}")


class MocapEncoder(nn.Module):
    """[B, T, D] motion-capture frames + mask -> [B, H] (GRU over packed sequences, or per-frame MLP)."""

    def __init__(self, kind: str, input_size: int, hidden_size: int):
        super().__init__()
        self.kind = kind
        if kind == "gru":
            self.rnn = nn.GRU(input_size, hidden_size // 2, batch_first=True, bidirectional=True)
        else:
            self.mlp = nn.Sequential(nn.Linear(input_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return masked_mean(self.mlp(x), mask)
        lengths = mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return masked_mean(out, mask)


class PatamiaForEmotionClassification(BaselinePreTrainedModel):
    """wav2vec2 + BERT (+ mocap) -> pooled vectors -> concat -> MLP -> classifier."""

    config_class = PatamiaConfig
    base_model_prefix = "patamia"
    _frozen_children = ("text_encoder",)
    _keep_in_fp32_modules_strict = ["fusion", "classifier", "contrastive_head", "mocap_encoder"]

    def __init__(
        self,
        config: PatamiaConfig,
        audio_encoder: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
    ):
        super().__init__(config)
        self.speech_encoder = SpeechEncoder(config.audio_config, config.audio_layers, frozen=config.freeze_encoder)
        if audio_encoder is not None:
            self.speech_encoder.encoder = audio_encoder.requires_grad_(not config.freeze_encoder)
        audio_dim = audio_hidden_size(config.audio_config)
        self.audio_norm = nn.LayerNorm(audio_dim)
        dims = [audio_dim]

        self.text_encoder = None
        if config.text_config is not None:
            self.text_encoder = text_encoder if text_encoder is not None else AutoModel.from_config(config.text_config)
            self.text_encoder.requires_grad_(not config.freeze_text_encoder)
            text_dim = config.text_config.hidden_size
            self.text_norm = nn.LayerNorm(text_dim)
            self.missing_text = nn.Parameter(torch.zeros(text_dim))
            dims.append(text_dim)

        self.mocap_encoder = None
        if config.mocap_dim:
            self.mocap_encoder = MocapEncoder(config.mocap_encoder, config.mocap_dim, config.mocap_hidden_size)
            self.mocap_norm = nn.LayerNorm(config.mocap_hidden_size)
            self.missing_mocap = nn.Parameter(torch.zeros(config.mocap_hidden_size))
            dims.append(config.mocap_hidden_size)

        f = config.fusion_hidden_size
        self.fusion = nn.Sequential(
            nn.Linear(sum(dims), f), nn.GELU(), nn.Dropout(config.fusion_dropout),
            nn.Linear(f, f), nn.GELU(), nn.Dropout(config.fusion_dropout),
        )
        self.classifier = nn.Sequential(nn.Linear(f, num_labels_of(config)))
        self.contrastive_head = contrastive_head(f, config.contrastive_dim)
        self._setup_loss_config()
        self.post_init()

    @classmethod
    def from_components(
        cls,
        encoder: str,
        text_encoder: str | None = DEFAULT_TEXT_ENCODER,
        *,
        id2label: dict[int, str],
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> PatamiaForEmotionClassification:
        """A fresh model around pretrained encoders (hub ids, local folders or ``builtin:*`` names).

        ``text_encoder=None`` builds an audio (+ mocap) model. The text encoder's tokenizer lives in the
        same folder (``AutoTokenizer.from_pretrained(resolve_model(text_encoder))``).
        """
        from ...hub import resolve_model

        audio_ref = resolve_model(encoder)
        text_ref = resolve_model(text_encoder) if text_encoder else None
        kwargs = {"dtype": dtype} if dtype is not None else {}
        audio_model = load_audio_encoder(audio_ref, **kwargs)
        text_model = AutoModel.from_pretrained(text_ref, **kwargs) if text_ref else None
        config = PatamiaConfig(
            audio_config=audio_model.config,
            text_config=text_model.config if text_model is not None else None,
            id2label=dict(id2label),
            label2id={v: k for k, v in id2label.items()},
            **config_kwargs,
        )
        return cls(config, audio_encoder=audio_model, text_encoder=text_model)

    # ------------------------------------------------------------------ branches

    def _audio_vector(self, input_features, feature_attention_mask, encoder_frames, encoder_frame_mask):
        if encoder_frames is not None:  # cached outputs of the same (frozen) encoder and layer selection
            frames, mask = encoder_frames, encoder_frame_mask.bool()
        else:
            frames, mask = self.speech_encoder(input_features, feature_attention_mask)
        return self.audio_norm(masked_mean(frames.to(self.head_dtype), mask))

    def _text_vector(self, batch_size, device, text_input_ids, text_attention_mask) -> torch.Tensor:
        missing = self.missing_text.to(self.head_dtype).expand(batch_size, -1)
        if text_input_ids is None:
            return missing
        if text_attention_mask is None:
            text_attention_mask = torch.ones_like(text_input_ids)
        frozen = not any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            hidden = self.text_encoder(
                input_ids=text_input_ids.to(device), attention_mask=text_attention_mask.to(device)
            ).last_hidden_state
        vec = self.text_norm(masked_mean(hidden.to(self.head_dtype), text_attention_mask.to(device)))
        present = text_attention_mask.to(device).bool().any(1, keepdim=True)
        return torch.where(present, vec, missing)

    def _mocap_vector(self, batch_size, device, mocap, mocap_mask) -> torch.Tensor:
        missing = self.missing_mocap.to(self.head_dtype).expand(batch_size, -1)
        if mocap is None:
            return missing
        mocap = mocap.to(device=device, dtype=self.head_dtype)
        if mocap.shape[-1] != self.config.mocap_dim:
            raise ValueError(f"mocap has {mocap.shape[-1]} features per frame, the model expects {self.config.mocap_dim}")
        if mocap_mask is None:
            mocap_mask = torch.ones(mocap.shape[:2], dtype=torch.long, device=device)
        mocap_mask = mocap_mask.to(device).bool()
        vec = self.mocap_norm(self.mocap_encoder(mocap, mocap_mask))
        return torch.where(mocap_mask.any(1, keepdim=True), vec, missing)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        emotion_labels: torch.Tensor | None = None,
        text_input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        mocap: torch.Tensor | None = None,
        mocap_mask: torch.Tensor | None = None,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_mask: torch.Tensor | None = None,
        **ignored,
    ) -> BaselineOutput:
        if input_features is None and encoder_frames is None:
            raise ValueError("Patamia needs input_features (waveforms) or cached encoder_frames")
        if text_input_ids is not None and self.text_encoder is None:
            raise ValueError("text_input_ids given but this model has no text branch (text_config=None)")
        if mocap is not None and self.mocap_encoder is None:
            raise ValueError("mocap given but this model has no mocap branch (mocap_dim=0)")
        if self.text_encoder is not None and text_input_ids is None and ignored.get("transcript_ids") is not None:
            logger.warning_once(
                "Patamia: transcript_ids (LLM tokenizer ids) are ignored; tokenize transcripts with the text "
                "encoder's tokenizer into text_input_ids / text_attention_mask to use the text branch"
            )
        audio = self._audio_vector(input_features, feature_attention_mask, encoder_frames, encoder_frame_mask)
        vectors = [audio]
        if self.text_encoder is not None:
            vectors.append(self._text_vector(audio.shape[0], audio.device, text_input_ids, text_attention_mask))
        if self.mocap_encoder is not None:
            vectors.append(self._mocap_vector(audio.shape[0], audio.device, mocap, mocap_mask))
        return self.output(self.fusion(torch.cat(vectors, dim=-1)), emotion_labels)

__all__ = ["DEFAULT_TEXT_ENCODER", "MocapEncoder", "PatamiaConfig", "PatamiaForEmotionClassification"]
