"""`bench/compare_systems.py` continues an interrupted comparison: a scored run is read back, a finished recipe
is not trained again, and a run's training time adds up the recipes' recorded times (unknown stays unknown)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compare(monkeypatch):
    spec = importlib.util.spec_from_file_location("compare_systems", REPO / "bench" / "compare_systems.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    def fake_emoq(*args: str) -> None:
        """`emoq run RECIPE ...` makes the recipe's `final/`; `emoq eval ... --out O` writes metrics."""
        calls.append(args[:2])
        if args[0] == "run":
            run_dir = Path(next(a for a in args if a.startswith("trainer.output_dir=")).split("=", 1)[1])
            (run_dir / module.RECIPE_FOLDERS[args[1]] / "final").mkdir(parents=True)
        else:
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            metrics = {m: 0.5 for m in module.METRICS} | {"rows_ok": 84, "rows_total": 84}
            (out / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")

    clock = iter(range(0, 10_000, 10))  # every recipe takes 10 s
    monkeypatch.setattr(module, "emoq", fake_emoq)
    monkeypatch.setattr(module.time, "time", lambda: next(clock))
    return module, calls


def test_a_rerun_trains_only_the_stage_whose_folder_was_removed(compare, tmp_path):
    module, calls = compare
    runs, evals = tmp_path / "runs", tmp_path / "eval"
    first = module.run_system("emoq", 1, tmp_path / "corpus", runs, evals)
    assert calls == [("run", "stage1_qformer"), ("run", "stage2_llm"), ("eval", "--model")]
    assert first["train_seconds"] == 20 and first["rows"] == "84/84"

    calls.clear()
    assert module.run_system("emoq", 1, tmp_path / "corpus", runs, evals) == first
    assert calls == []  # scored: read back

    (evals / "emoq" / "seed1" / "result.json").unlink()
    shutil.rmtree(runs / "emoq" / "seed1" / "stage2")
    again = module.run_system("emoq", 1, tmp_path / "corpus", runs, evals)
    assert calls == [("run", "stage2_llm"), ("eval", "--model")]
    assert again["train_seconds"] == 20  # stage 1's recorded 10 s + stage 2's new 10 s


def test_a_finished_recipe_without_a_recorded_time_leaves_the_time_unknown(compare, tmp_path):
    module, calls = compare
    (tmp_path / "runs" / "emoq" / "seed0" / "stage1" / "final").mkdir(parents=True)
    result = module.run_system("emoq", 0, tmp_path / "corpus", tmp_path / "runs", tmp_path / "eval")
    assert calls == [("run", "stage2_llm"), ("eval", "--model")]
    assert result["train_seconds"] is None and result["weighted_f1"] == 0.5


def test_the_table_names_partial_rows_and_untimed_runs():
    spec = importlib.util.spec_from_file_location("compare_table", REPO / "bench" / "compare_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stats = {"weighted_f1": {"mean": 0.99, "std": 0.01, "n": 3}, "train_seconds": {"mean": 600.0, "std": 30.0, "n": 2}}
    result = {"seeds": [0, 1, 2], "systems": {
        "emoq_no_supcon": {"runs": [{"seed": 0}, {"seed": 1}, {"seed": 2}], "summary": stats},
        "qieemo": {"runs": [{"seed": 0}], "summary": {"weighted_f1": {"mean": 0.5, "std": 0.0, "n": 1}}},
        "references": {"weighted_f1": {"prosody": 0.506}}}}
    rows = module.table(result).splitlines()
    assert rows[2] == "| EmoQ without SupCon | 0.990 ± 0.010 | – | – | 10.0 ± 0.5 (2 of 3 runs timed) |"
    assert rows[3] == "| Qieemo (audio only) (seeds 0 only) | 0.500 | – | – | – |"
    assert rows[4] == "| reference: logistic regression on prosody | 0.506 | – | – | – |"
