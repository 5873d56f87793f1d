"""How long do ``builtin:`` models take to resolve: first time (conversion) vs. cached?

    DS_ACCELERATOR=cpu python bench/bench_hub_cache.py            # fresh temp cache, removed after
    python bench/bench_hub_cache.py --cache-dir /tmp/c --keep     # keep the converted folders

Prints a markdown table. torch/transformers are imported before timing so that the first row
does not pay for imports the others get for free.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", help="cache root to use (must not hold the models yet); default: temp dir")
    parser.add_argument("--keep", action="store_true", help="do not delete the cache afterwards")
    parser.add_argument("--models", nargs="*", help="builtin names (default: all)")
    args = parser.parse_args()

    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="emoq-bench-cache-"))
    os.environ["EMOQ_CACHE"] = str(cache)

    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from emoq.hub import BUILTIN_MODELS, MissingModelPackageError, resolve_model

    import_s = time.perf_counter() - t0
    names = args.models or list(BUILTIN_MODELS)

    rows = []
    try:
        for name in names:
            ref = f"builtin:{name}"
            try:
                start = time.perf_counter()
                folder = Path(resolve_model(ref))
                first = time.perf_counter() - start
            except MissingModelPackageError as exc:
                rows.append(f"| `{ref}` | skipped: {exc} | | |")
                continue
            start = time.perf_counter()
            resolve_model(ref)
            second = time.perf_counter() - start
            rows.append(f"| `{ref}` | {first:.2f} | {second * 1000:.2f} | {folder_mib(folder):.0f} |")
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)

    print(f"\nimport torch + transformers (excluded below): {import_s:.1f} s; "
          f"{torch.get_num_threads()} torch threads\n")
    print("| model | first resolve (convert), s | second resolve (cache hit), ms | folder, MiB |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
