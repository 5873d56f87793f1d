"""Cost of 3 s vs 30 s of audio through the Whisper wrapper (no forced 30 s padding).

    python bench/bench_encoder_length.py [--encoder builtin:whisper-tiny.en] [--repeats 5]

Prints a markdown table; the README quotes the ratio. Uses the real converted Whisper tiny.en
encoder when available (offline, from PyPI), else a random encoder of the same shape.
"""

from __future__ import annotations

import argparse
import time

import torch


def build_encoder(ref: str):
    from transformers import AutoConfig

    from emoq.hub import resolve_model
    from emoq.models.speech_encoder import SpeechEncoder, load_audio_encoder

    path = resolve_model(ref)
    enc = SpeechEncoder(AutoConfig.from_pretrained(path)).eval()
    enc.encoder = load_audio_encoder(path).eval()
    return enc


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="builtin:whisper-tiny.en")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    enc = build_encoder(args.encoder)
    rows = []
    with torch.no_grad():
        for seconds in (3, 30):
            mel = torch.randn(args.batch, 80, seconds * 100)
            rows.append((seconds, time_call(lambda mel=mel: enc(mel), args.repeats)))
    print(f"| audio | median s / batch of {args.batch} | relative |\n|---|---:|---:|")
    for seconds, t in rows:
        print(f"| {seconds} s | {t:.4f} | {t / rows[-1][1]:.3f} |")


if __name__ == "__main__":
    main()
