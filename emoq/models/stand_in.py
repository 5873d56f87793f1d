"""Stand-in model folders: a published checkpoint's architecture with random weights, saved the way
`save_pretrained` saves it (weights, config, tokenizer or feature extractor), so every loading path —
`from_components`, bitsandbytes quantization, LoRA target matching, dtype handling — runs as it would on
the real checkpoint, without a download.

Two sizes:
- "tiny": the same model family (Whisper encoder, Qwen2 LLM, wav2vec2 encoder, BERT text model) shrunk to
  a few layers of width 32-64, for tests that run a shipped real-scale config on CPU in seconds;
- "full": the published widths and depths (7B for Qwen2.5-7B), for throughput and memory checks on a GPU
  (`bench/gpu_check.py`) and for `emoq estimate-memory`, which needs the architecture but no weights.

`stand_in_overrides` turns a shipped config into its stand-in twin: only the model references change
(plus, for "tiny", the widths that follow from them); precision, LoRA targets, quantization, transcript
use, loss weights, accumulation and checkpointing stay as shipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..audio import SAMPLE_RATE


@dataclass(frozen=True)
class Published:
    """A published checkpoint's family and architecture (its config.json's fields that set the size)."""

    family: str  # whisper | qwen2 | wav2vec2 | bert
    config: dict


#: the checkpoints the shipped configs name, with the architecture fields of their config.json
PUBLISHED: dict[str, Published] = {
    "openai/whisper-large-v3": Published("whisper", dict(
        d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, decoder_layers=32,
        decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128, vocab_size=51866,
        max_source_positions=1500, max_target_positions=448)),
    "Qwen/Qwen2.5-7B-Instruct": Published("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "facebook/wav2vec2-large-960h-lv60-self": Published("wav2vec2", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16)),
    "google-bert/bert-base-uncased": Published("bert", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522,
        max_position_embeddings=512)),
}

#: what "tiny" changes per family: depth kept small but > 2 so that middle-layer choices stay distinct;
#: LLM widths are multiples of 32 (bitsandbytes' 4-bit CPU kernel needs that)
TINY: dict[str, dict] = {
    "whisper": dict(d_model=32, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                    decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=64, max_target_positions=32),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024),
    "wav2vec2": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     conv_dim=(16, 16), conv_stride=(5, 64), conv_kernel=(10, 64), num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4),
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=256),
}

#: the width-setting fields of a run config that follow the model size (tiny stand-ins only)
TINY_RUN_OVERRIDES = {
    "emoq": ["model.num_query_tokens=4", "model.qformer.hidden_size=32", "model.qformer.num_hidden_layers=2",
             "model.qformer.num_attention_heads=4", "model.qformer.intermediate_size=64", "model.contrastive_dim=16"],
    "qieemo": ["model.fusion_hidden_size=32", "model.fusion_num_heads=4", "model.ppg_dim=16", "model.contrastive_dim=16"],
    "patamia": ["model.fusion_hidden_size=32", "model.contrastive_dim=16"],
}


def published(ref: str) -> Published:
    if ref not in PUBLISHED:
        raise KeyError(f"no stand-in for '{ref}' (known: {', '.join(PUBLISHED)})")
    return PUBLISHED[ref]


def stand_in_config(ref: str, size: str = "tiny", vocab_size: int | None = None):
    """The transformers config of `ref`'s architecture ("full") or of its tiny twin ("tiny")."""
    from transformers import BertConfig, Qwen2Config, Wav2Vec2Config, WhisperConfig

    spec = published(ref)
    fields = dict(spec.config)
    if size == "tiny":
        fields.update(TINY[spec.family])
    elif size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    if vocab_size is not None and spec.family in ("qwen2", "bert"):
        fields["vocab_size"] = vocab_size
    if spec.family == "whisper":
        fields.update(pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1,
                      begin_suppress_tokens=None, suppress_tokens=None)
    config_class = {"whisper": WhisperConfig, "qwen2": Qwen2Config, "wav2vec2": Wav2Vec2Config,
                    "bert": BertConfig}[spec.family]
    return config_class(**fields)


def layer_count(ref: str, size: str = "tiny") -> int:
    config = stand_in_config(ref, size)
    return getattr(config, "encoder_layers", None) or config.num_hidden_layers


def scale_layers(layers: list[int], ref: str) -> list[int]:
    """A published encoder's layer indices mapped onto its tiny twin's depth at the same relative place
    (Whisper-large-v3's [16, 20, 24, 28, 32] of 32 -> [2, 3, 4] of 4); index 0 (embeddings) stays 0."""
    full, tiny = layer_count(ref, "full"), layer_count(ref, "tiny")
    scaled = []
    for i in layers:
        j = i if i <= 0 else max(1, round(i * tiny / full))
        if j not in scaled:
            scaled.append(j)
    return scaled


def write_stand_in(ref: str, folder: str | Path, size: str = "tiny", seed: int = 0, dtype=None, device=None) -> Path:
    """Write `ref`'s stand-in (random weights of its architecture, its preprocessor) to `folder`, once:
    a folder that already holds it is reused. `dtype` / `device`: where the random weights are made and in
    which dtype they are saved (a "full" 7B LLM is made fastest on a GPU, in bf16)."""
    import torch

    from .tiny import tiny_tokenizer

    folder = Path(folder)
    marker = folder / "stand_in.json"
    stamp = {"ref": ref, "size": size, "seed": seed, "dtype": str(dtype)}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return folder
    family = published(ref).family
    tokenizer = tiny_tokenizer() if family in ("qwen2", "bert") else None
    config = stand_in_config(ref, size, vocab_size=len(tokenizer) if tokenizer is not None and size == "tiny" else None)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model, preprocessor = _random_model(family, config, tokenizer)
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    preprocessor.save_pretrained(folder)
    marker.write_text(json.dumps(stamp), encoding="utf-8")
    return folder


def _random_model(family: str, config, tokenizer):
    """(model with random weights, its preprocessor) of one family."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        Wav2Vec2FeatureExtractor,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    from .tiny import fan_in_init

    if family == "whisper":
        model = WhisperModel(config)
        fan_in_init(model.encoder)  # a random tiny encoder then keeps what differs between inputs
        preprocessor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE)
    elif family == "wav2vec2":
        model = AutoModel.from_config(config)
        fan_in_init(model)
        preprocessor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True,
                                                return_attention_mask=True)
    elif family == "qwen2":
        model, preprocessor = AutoModelForCausalLM.from_config(config), tokenizer
    else:
        model, preprocessor = AutoModel.from_config(config), tokenizer
    return model, preprocessor


def stand_in_overrides(cfg, folder: str | Path, size: str = "tiny", **write_kwargs) -> list[str]:
    """`key=value` overrides that turn a shipped real-scale run config into its stand-in twin: each model
    reference becomes a stand-in folder under `folder` (written here), encoder layer choices follow the
    depth, and ("tiny") the widths that follow the model size shrink. Nothing else changes. `write_kwargs`:
    `write_stand_in`'s dtype and device."""
    folder = Path(folder)
    m = cfg.model
    refs = {"model.encoder": m.encoder}
    if m.system == "emoq":
        refs["model.llm"] = m.llm
    if m.system == "patamia" and m.text_encoder:
        refs["model.text_encoder"] = m.text_encoder
    overrides = []
    for key, ref in refs.items():
        path = write_stand_in(ref, folder / f"{size}-{ref.replace('/', '--')}", size, **write_kwargs)
        overrides.append(f"{key}={path}")
    if size == "tiny":
        overrides.append(f"model.encoder_layers={json.dumps(scale_layers(m.encoder_layers, m.encoder))}")
        overrides += TINY_RUN_OVERRIDES[m.system]
    return overrides
