"""EmoQ, its ablations and the two baselines on the demo corpus, trained and scored the same way, over seeds.

    python bench/compare_systems.py [--out demo_out] [--seeds 0 1 2] [--systems NAME ...] [--json FILE] [--collect]

Needs the demo corpus (`make demo`, or `emoq demo --only-data`). For every seed, each system is trained
with `emoq run` on the same corpus and split and scored with `emoq eval` on the demo test split — every
system's dev-selected checkpoint (`best/`):

- `emoq`: stage 1 + stage 2 of `emoq/demo_cpu` (speech + gold transcripts), label scoring under the LLM;
- `emoq_audio_only`, `emoq_no_supcon`, `emoq_cross_entropy` (focal_gamma 0: focal loss is cross-entropy):
  the same with one setting changed;
- `emoq_stage1_head`: the `emoq` run's stage-1 model, scored by its classification head (no LLM);
- `qieemo`, `patamia`: `emoq run train_baseline` with their `demo_cpu` configs;
- `references`: logistic regressions on prosody statistics, on bag-of-words, and on both (no seed: fitted
  once), which bound what each modality alone carries in the corpus.

Writes one JSON (default `OUT/compare_systems.json`) with every run's metrics and wall-clock training time,
and the mean and standard deviation over seeds; `bench/compare_table.py` turns it into the README table. A run
already scored is read back rather than trained again, and a recipe that already finished is not trained again,
so an interrupted comparison continues where it stopped; `--collect` only gathers what is scored so far.
Training times are this machine's; weighted F1 can move a little between machines (float summation order
differs between CPU kernels), and more between seeds, which is why seeds are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("weighted_f1", "unweighted_accuracy", "macro_f1", "accuracy")

#: system -> (recipes, config, overrides, eval mode, stage folder evaluated)
EMOQ_RECIPES = ("stage1_qformer", "stage2_llm")
SYSTEMS = {
    "emoq": (EMOQ_RECIPES, "emoq/demo_cpu", (), "score", "stage2"),
    "emoq_audio_only": (EMOQ_RECIPES, "emoq/demo_cpu", ("model.use_transcript=false", "data.use_transcript=false"),
                        "score", "stage2"),
    "emoq_no_supcon": (EMOQ_RECIPES, "emoq/demo_cpu", ("loss.supcon_weight=0",), "score", "stage2"),
    "emoq_cross_entropy": (EMOQ_RECIPES, "emoq/demo_cpu", ("loss.focal_gamma=0",), "score", "stage2"),
    "emoq_stage1_head": ((), "emoq/demo_cpu", (), "head", "stage1"),  # the `emoq` run's stage 1
    "qieemo": (("train_baseline",), "qieemo/demo_cpu", (), "score", "baseline"),
    "patamia": (("train_baseline",), "patamia/demo_cpu", (), "score", "baseline"),
}


#: the folder under the run directory that each recipe trains into
RECIPE_FOLDERS = {"stage1_qformer": "stage1", "stage2_llm": "stage2", "train_baseline": "baseline"}


def emoq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "emoq.cli", *args], check=True)


def train_recipe(recipe: str, config: str, run_dir: Path, corpus: Path, seed: int, overrides) -> float | None:
    """Wall-clock seconds of one recipe's training. A recipe that already finished (`final/` exists) is not
    trained again, so a system that changes only stage 2 can rerun just that stage after deleting its
    `stage2/` folder; its recorded time (`compare_seconds.json`) is read back, None where none was recorded."""
    folder = run_dir / RECIPE_FOLDERS[recipe]
    timing = folder / "compare_seconds.json"
    if (folder / "final").is_dir():
        return json.loads(timing.read_text(encoding="utf-8"))["seconds"] if timing.is_file() else None
    start = time.time()
    emoq("run", recipe, "--config", config, f"data.root={corpus}", f"trainer.output_dir={run_dir}",
         f"seed={seed}", *overrides)
    seconds = time.time() - start
    timing.write_text(json.dumps({"seconds": seconds}), encoding="utf-8")
    return seconds


def run_system(name: str, seed: int, corpus: Path, runs: Path, evals: Path) -> dict:
    """Train and score one system for one seed; a run already scored (its `result.json`) is read back,
    so an interrupted comparison continues where it stopped."""
    recipes, config, overrides, mode, stage = SYSTEMS[name]
    out = evals / name / f"seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    run_dir = runs / (name if recipes else "emoq") / f"seed{seed}"
    times = [train_recipe(recipe, config, run_dir, corpus, seed, overrides) for recipe in recipes]
    seconds = sum(times) if recipes and None not in times else None
    emoq("eval", "--model", str(run_dir / stage / "best"), "--dataset", "meld", "--root", str(corpus),
         "--split", "test", "--mode", mode, "--out", str(out))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    result = {"seed": seed, "train_seconds": seconds, **{m: metrics[m] for m in METRICS},
              "rows": f"{metrics['rows_ok']}/{metrics['rows_total']}"}
    done.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in (*METRICS, "train_seconds"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"mean": statistics.fmean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="the folder holding the demo corpus (OUT/corpus)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--systems", nargs="+", default=[*SYSTEMS, "references"],
                        choices=[*SYSTEMS, "references"])
    parser.add_argument("--json", default=None, help="output JSON (default OUT/compare_systems.json)")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: gather the runs already scored (a comparison still under way)")
    args = parser.parse_args()
    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "test_sent_emo.csv").is_file():
        raise SystemExit(f"{corpus}: no demo corpus; run `make demo` (or `emoq demo --only-data`) first")
    if "emoq_stage1_head" in args.systems and "emoq" not in args.systems:
        raise SystemExit("emoq_stage1_head scores the `emoq` run's stage 1: include the emoq system")
    path = Path(args.json) if args.json else out / "compare_systems.json"
    result = {"corpus": str(corpus), "seeds": args.seeds, "systems": {}}
    for name in args.systems:
        if name == "references":
            from emoq.evaluation.references import score_references

            result["systems"]["references"] = score_references(corpus)
            continue
        evals = out / "compare" / "eval"
        if args.collect:
            done = [evals / name / f"seed{seed}" / "result.json" for seed in args.seeds]
            runs = [json.loads(f.read_text(encoding="utf-8")) for f in done if f.is_file()]
            if not runs:
                continue
        else:
            runs = [run_system(name, seed, corpus, out / "compare" / "runs", evals) for seed in args.seeds]
        result["systems"][name] = {"runs": runs, "summary": summary(runs)}
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")  # partial results survive a stop
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {path}; table: python bench/compare_table.py {path}")


if __name__ == "__main__":
    main()
