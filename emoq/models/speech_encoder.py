"""One wrapper for any HF audio encoder (Whisper encoder, HuBERT, WavLM, wav2vec2).

Why a wrapper: the EmoQ-Former needs, from every encoder, the same thing — a padded batch of
frame vectors plus a frame mask — while the encoders disagree on inputs (log-mel vs waveform),
on masking (Whisper ignores masks) and on length (Whisper insists on 30 s of frames).

Whisper is run with its own submodules but without the 30 s constraint: the position table is
sliced to the clip's length, so 3 s of audio costs 3 s of compute, and padded frames are zeroed
between the convolutions and masked in self-attention. That makes a padded batch give exactly
the per-clip result (bs=1 == bs=N), which stock Whisper does not.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..audio import SAMPLE_RATE
from .emoq.configuration_emoq import audio_hidden_size


def is_whisper(config: PreTrainedConfig) -> bool:
    return config.model_type == "whisper"


def frame_spec_of(audio_config: PreTrainedConfig) -> dict:
    """How encoder frames follow from input length, as plain data (saved with the processor):
    {"kind": "whisper"} (log-mel in, one frame per two mel steps) or {"kind": "conv", "kernels": [...],
    "strides": [...]} (waveform in, the wav2vec2 family's feature convolutions and adapter layers)."""
    if is_whisper(audio_config):
        return {"kind": "whisper"}
    kernels, strides = list(audio_config.conv_kernel), list(audio_config.conv_stride)
    if getattr(audio_config, "add_adapter", False):
        kernels += [1] * audio_config.num_adapter_layers
        strides += [audio_config.adapter_stride] * audio_config.num_adapter_layers
    return {"kind": "conv", "kernels": kernels, "strides": strides}


def encoder_output_length(frame_spec: dict, input_length):
    """Encoder frames for an input of `input_length` mel steps (Whisper) or samples (an int or a tensor of
    them). The processor counts placeholders with it and the encoder masks frames with it, so the two can
    never disagree about how many query states a clip gets."""
    if frame_spec["kind"] == "whisper":
        return (input_length - 1) // 2 + 1
    length = input_length
    for kernel, stride in zip(frame_spec["kernels"], frame_spec["strides"]):
        length = (length - kernel) // stride + 1
    return length.clamp(min=0) if isinstance(length, torch.Tensor) else max(length, 0)


def frames_per_second(frame_spec: dict) -> float:
    """Encoder frames per second of audio at SAMPLE_RATE (50 for Whisper and the wav2vec2 family)."""
    if frame_spec["kind"] == "whisper":
        return 50.0  # 100 mel steps per second, halved by the second convolution
    return SAMPLE_RATE / math.prod(frame_spec["strides"])


def build_audio_encoder(config: PreTrainedConfig) -> nn.Module:
    """Random-weight encoder from a config (weights are loaded later by `from_pretrained`)."""
    if is_whisper(config):
        return WhisperEncoder(config)
    return AutoModel.from_config(config)


def load_audio_encoder(ref: str, **kwargs) -> nn.Module:
    """Pretrained encoder from a hub id or local folder; for Whisper only the encoder half is kept."""
    config = AutoConfig.from_pretrained(ref)
    if is_whisper(config):
        return WhisperModel.from_pretrained(ref, **kwargs).get_encoder()
    return AutoModel.from_pretrained(ref, **kwargs)


class SpeechEncoder(nn.Module):
    """Frames out of any HF audio encoder, with layer selection and an optional learned layer mix.

    `layers`: [] = the encoder's final output; [i] = hidden state i (0 = embeddings, negative
    indices allowed); several = softmax-weighted sum with learned weights (trainable even when the
    encoder itself is frozen — the Qieemo finding that middle layers carry emotion).
    """

    def __init__(self, config: PreTrainedConfig, layers: list[int] | None = None, frozen: bool = True):
        super().__init__()
        self.config = config
        self.frame_spec = frame_spec_of(config)
        self.encoder = build_audio_encoder(config)
        self.layers = list(layers or [])
        self.layer_weights = nn.Parameter(torch.zeros(len(self.layers))) if len(self.layers) > 1 else None
        self.frozen = frozen
        if frozen:
            self.encoder.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return audio_hidden_size(self.config)

    @property
    def frames_per_second(self) -> float:
        return frames_per_second(self.frame_spec)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # a frozen encoder never runs dropout / layer-drop
        return self

    def output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Number of valid encoder frames for inputs of `input_lengths` (mel frames or samples)."""
        return encoder_output_length(self.frame_spec, input_lengths.long())

    def forward(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor | None = None):
        """Returns (frames [B, T, H], frame_mask [B, T] bool)."""
        if feature_attention_mask is None:
            feature_attention_mask = torch.ones(
                input_features.shape[0], input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        lengths = self.output_lengths(feature_attention_mask.sum(-1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if is_whisper(self.config):
                hidden_states = self._whisper_hidden_states(input_features, feature_attention_mask)
            else:
                dtype = next(self.encoder.parameters()).dtype  # a bf16 encoder takes bf16 waveforms
                out = self.encoder(
                    input_features.to(dtype), attention_mask=feature_attention_mask.long(), output_hidden_states=True
                )
                hidden_states = list(out.hidden_states[:-1]) + [out.last_hidden_state]
        frames = self._select(hidden_states)
        frame_mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
        return frames, frame_mask

    def _select(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        if not self.layers:
            return hidden_states[-1]
        if self.layer_weights is None:
            return hidden_states[self.layers[0]]
        stacked = torch.stack([hidden_states[i] for i in self.layers], dim=0)
        weights = torch.softmax(self.layer_weights.float(), dim=0).to(stacked.dtype)
        return (weights[:, None, None, None] * stacked).sum(0)

    def _whisper_hidden_states(self, mel: torch.Tensor, mel_mask: torch.Tensor) -> list[torch.Tensor]:
        enc: WhisperEncoder = self.encoder
        n_frames = encoder_output_length(self.frame_spec, mel.shape[-1])
        if n_frames > enc.embed_positions.num_embeddings:
            raise ValueError(
                f"audio too long for this Whisper encoder: {mel.shape[-1]} mel frames > "
                f"{2 * enc.embed_positions.num_embeddings}; use window-level queries or max_seconds"
            )
        mel = mel.to(enc.conv1.weight.dtype) * mel_mask[:, None, :].to(enc.conv1.weight.dtype)
        x = nn.functional.gelu(enc.conv1(mel)) * mel_mask[:, None, :].to(mel.dtype)
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        frame_mask = torch.arange(n_frames, device=x.device)[None, :] < self.output_lengths(mel_mask.sum(-1))[:, None]
        x = (x + enc.embed_positions.weight[:n_frames]) * frame_mask[..., None].to(x.dtype)
        # additive 4D mask: padded keys get -inf-like scores, so real frames never attend to padding
        bias = torch.zeros(frame_mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~frame_mask, torch.finfo(x.dtype).min)[:, None, None, :]
        hidden_states = [x]
        for layer in enc.layers:
            x = layer(x, bias)
            hidden_states.append(x)
        hidden_states[-1] = enc.layer_norm(x)
        return hidden_states
