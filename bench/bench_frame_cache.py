"""Stage 1's encoder-frame cache: emoq's safetensors shards against a `datasets` (Arrow) cache of the same frames.

    python bench/bench_frame_cache.py [--clips 500] [--hidden 384] [--min-frames 50] [--max-frames 500]

Both stores hold the same random frames (variable length per clip, as the cache keeps only a clip's valid
frames): safetensors via `EncoderFrameCache` (one file, read through mmap by key), Arrow via
`datasets.Dataset.from_generator` with an `Array2D(shape=(None, H))` column, read with the torch format by
row index. Times writing everything once, then reading every clip in a shuffled order (what a training epoch
does), and the bytes on disk. Prints a markdown table with the ratios Arrow / safetensors; the absolute
times depend on the disk and the CPU, the ratios much less. Arrow has no bfloat16: a bf16 encoder's frames
would be stored as float32 there (twice the bytes), which the table does not count in Arrow's favour or
against it (both store float32 here).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def frames(n: int, hidden: int, lo: int, hi: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {f"clip{i:06d}": torch.from_numpy(rng.standard_normal((int(rng.integers(lo, hi)), hidden),
                                                                 dtype=np.float32)) for i in range(n)}


def bench_safetensors(data: dict, folder: Path, order: list[str]) -> tuple[float, float, float]:
    from safetensors.torch import save_file

    from emoq.training.frame_cache import EncoderFrameCache

    path = folder / "shard-00000-of-00001.safetensors"
    t = time.perf_counter()
    save_file(data, str(path), metadata={"fingerprint": "bench"})
    write = time.perf_counter() - t
    t = time.perf_counter()
    cache = EncoderFrameCache([path])
    total = sum(float(cache[k].sum()) for k in order)  # every byte touched
    read = time.perf_counter() - t
    assert np.isfinite(total)
    return write, read, folder_mib(folder)


def bench_arrow(data: dict, folder: Path, order: list[str]) -> tuple[float, float, float]:
    import datasets

    hidden = next(iter(data.values())).shape[1]
    features = datasets.Features({"key": datasets.Value("string"),
                                  "frames": datasets.Array2D(shape=(None, hidden), dtype="float32")})

    def rows():
        for key, value in data.items():
            yield {"key": key, "frames": value.numpy()}

    t = time.perf_counter()
    dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(folder / "build"))
    dataset.save_to_disk(str(folder / "cache"))
    write = time.perf_counter() - t
    t = time.perf_counter()
    stored = datasets.load_from_disk(str(folder / "cache")).with_format("torch", columns=["frames"])
    index = {key: i for i, key in enumerate(datasets.load_from_disk(str(folder / "cache"))["key"])}
    total = sum(float(stored[index[k]]["frames"].sum()) for k in order)
    read = time.perf_counter() - t
    assert np.isfinite(total)
    return write, read, folder_mib(folder / "cache")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=384, help="frame width (Whisper tiny 384, large 1280)")
    parser.add_argument("--min-frames", type=int, default=50)
    parser.add_argument("--max-frames", type=int, default=500, help="50 frames per second of audio (Whisper)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    data = frames(args.clips, args.hidden, args.min_frames, args.max_frames)
    order = list(np.random.default_rng(1).permutation(list(data)))
    root = Path(tempfile.mkdtemp(prefix="emoq-bench-frames-"))
    try:
        (root / "st").mkdir()
        (root / "arrow").mkdir()
        st = bench_safetensors(data, root / "st", order)
        ar = bench_arrow(data, root / "arrow", order)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mib = sum(v.numel() * 4 for v in data.values()) / 2**20
    print(f"{args.clips} clips, {mib:.0f} MiB of float32 frames (hidden {args.hidden})\n")
    print("| store | write s | shuffled read of every clip s | MiB on disk |")
    print("|---|---|---|---|")
    print(f"| safetensors (emoq) | {st[0]:.2f} | {st[1]:.2f} | {st[2]:.0f} |")
    print(f"| datasets Arrow | {ar[0]:.2f} | {ar[1]:.2f} | {ar[2]:.0f} |")
    print(f"| ratio Arrow / safetensors | {ar[0] / st[0]:.1f}x | {ar[1] / st[1]:.1f}x | {ar[2] / st[2]:.2f}x |")


if __name__ == "__main__":
    main()
