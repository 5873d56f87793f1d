"""EmoQ vs the two baselines on the demo corpus, trained and scored the same way (after `make demo`).

    python bench/compare_systems.py [--out demo_out]

Trains Qieemo and Patamia et al. 2023 with `emoq run train_baseline` (configs qieemo/demo_cpu,
patamia/demo_cpu: same corpus, MAL loss, loop and dev selection as EmoQ), scores each with
`emoq eval` on the demo test split — every system's dev-selected checkpoint (`best/`), as EmoQ's — and
prints one markdown table next to EmoQ's own `demo_out/eval/metrics.json`. Training time is wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def emoq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "emoq.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="the folder `make demo` wrote (corpus, eval)")
    args = parser.parse_args()
    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "test_sent_emo.csv").is_file():
        raise SystemExit(f"{corpus}: no demo corpus; run `make demo` (or `emoq demo --only-data`) first")
    rows = []
    emoq_metrics = out / "eval" / "metrics.json"
    if emoq_metrics.is_file():
        rows.append(("EmoQ (stage 2, label scoring)", json.loads(emoq_metrics.read_text()), None))
    for system in ("qieemo", "patamia"):
        run_dir = out / "runs" / f"{system}_cpu"
        start = time.time()
        emoq("run", "train_baseline", "--config", f"{system}/demo_cpu", f"data.root={corpus}",
             f"trainer.output_dir={run_dir}")
        seconds = time.time() - start
        eval_dir = out / f"eval_{system}"
        emoq("eval", "--model", str(run_dir / "baseline" / "best"), "--dataset", "meld", "--root", str(corpus),
             "--split", "test", "--out", str(eval_dir))
        rows.append((system, json.loads((eval_dir / "metrics.json").read_text()), seconds))
    print("\n| system | test weighted F1 | accuracy (WA) | UA | macro F1 | rows scored | training time |")
    print("|---|---|---|---|---|---|---|")
    for name, m, seconds in rows:
        took = f"{seconds / 60:.1f} min" if seconds is not None else "(see make demo)"
        print(f"| {name} | {m['weighted_f1']:.3f} | {m['accuracy']:.3f} | {m['unweighted_accuracy']:.3f} | "
              f"{m['macro_f1']:.3f} | {m['rows_ok']}/{m['rows_total']} | {took} |")


if __name__ == "__main__":
    main()
