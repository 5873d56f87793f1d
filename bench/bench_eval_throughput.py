"""Evaluation throughput (utterances/s): batch size 1 vs batched, label scoring vs free generation.

    python bench/bench_eval_throughput.py --model demo_out/runs/demo_cpu/stage2/best [--n 32]

Uses clips of the demo corpus test split (or random noise clips if --corpus is not given).
Prints a markdown table of utterances/s and the ratios quoted in the README.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", default=None, help="demo corpus root (MELD layout)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from emoq.inference import EmotionRecognizer

    rec = EmotionRecognizer.from_pretrained(args.model, device="cpu")
    if args.corpus:
        from emoq.data.meld import read_meld

        clips = [rec.load(u.audio) for u in read_meld(args.corpus, "test")[: args.n]]
    else:
        rng = np.random.default_rng(0)
        clips = [(rng.standard_normal(int(16000 * rng.uniform(1.5, 3.0))) * 0.1).astype(np.float32)
                 for _ in range(args.n)]
    question = rec.processor.default_question()
    runs = {
        "score, bs=1": lambda: rec.classify_batch(clips, batch_size=1),
        f"score, bs={args.batch}": lambda: rec.classify_batch(clips, batch_size=args.batch),
        "generate, bs=1": lambda: [rec.chat_batch([c], [question], max_new_tokens=8) for c in clips],
        f"generate, bs={args.batch}": lambda: [
            rec.chat_batch(clips[i : i + args.batch], [question] * len(clips[i : i + args.batch]), max_new_tokens=8)
            for i in range(0, len(clips), args.batch)
        ],
    }
    rates = {}
    for name, fn in runs.items():
        t = time.perf_counter()
        fn()
        rates[name] = len(clips) / (time.perf_counter() - t)
    base = rates["score, bs=1"]
    print("| mode | utterances/s | vs score bs=1 |\n|---|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {r:.2f} | {r / base:.2f}x |")


if __name__ == "__main__":
    main()
