"""`emoq predict`, interrupted: an earlier complete output is never destroyed before a new one replaces it, and
`--resume` keeps the rows already written for the same inputs, in the same order, and predicts only the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support.environment import tail
from support.media import read_jsonl

import emoq.evaluation.runner as runner
from emoq.audio import write_wav
from emoq.cli import main as cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(11)
    return [str(write_wav(folder / f"clip{i}.wav", (rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32)))
            for i, s in enumerate((0.6, 1.3, 0.9, 1.1, 0.7, 1.6))]


@pytest.fixture
def predict(saved_model):
    return lambda *args: cli(["predict", "--model", str(saved_model), "--device", "cpu", *map(str, args)])


@pytest.fixture
def scored(monkeypatch):
    """The inputs each `score_rows` call is given (what a run predicts rather than keeps)."""
    calls: list[list[str]] = []
    real = runner.score_rows

    def spy(recognizer, rows, **kwargs):
        calls.append([r.input for r in rows])
        yield from real(recognizer, rows, **kwargs)

    monkeypatch.setattr(runner, "score_rows", spy)
    return calls


def _interrupted(monkeypatch, predict, after: int, *args) -> None:
    """A run stopped (Ctrl-C) right after its `after`-th row was written."""
    real = runner.score_rows

    def stop_after(recognizer, rows, **kwargs):
        for n, result in enumerate(real(recognizer, rows, **kwargs), start=1):
            yield result
            if n == after:
                raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runner, "score_rows", stop_after)
        with pytest.raises(KeyboardInterrupt):
            predict(*args)


def _same_predictions(got: list[dict], expected: list[dict]) -> None:
    assert [(r["input"], r["status"], r["label"]) for r in got] == [(r["input"], r["status"], r["label"])
                                                                    for r in expected]
    for r, e in zip(got, expected):
        assert set(r) == set(e)
        np.testing.assert_allclose(list(r["scores"].values()), list(e["scores"].values()), rtol=1e-5, atol=1e-6)


def test_an_interrupted_run_leaves_the_earlier_output_as_it_was(predict, wavs, tmp_path, monkeypatch):
    out = tmp_path / "preds.jsonl"
    assert predict("--out", out, *wavs) == 0
    before = out.read_bytes()
    _interrupted(monkeypatch, predict, 2, "--out", out, *wavs)
    assert out.read_bytes() == before
    # a first run that is interrupted leaves no output that could pass for a complete one
    fresh = tmp_path / "fresh.jsonl"
    _interrupted(monkeypatch, predict, 2, "--out", fresh, *wavs)
    assert not fresh.exists()


def test_resume_predicts_only_the_rest_and_matches_an_uninterrupted_run(predict, wavs, tmp_path, monkeypatch,
                                                                        scored, capsys):
    reference = tmp_path / "reference" / "preds.jsonl"
    assert predict("--out", reference, *wavs) == 0
    out = tmp_path / "out" / "preds.jsonl"
    _interrupted(monkeypatch, predict, 3, "--out", out, *wavs)
    scored.clear()
    capsys.readouterr()
    assert predict("--out", out, "--resume", *wavs) == 0
    assert scored == [wavs[3:]]
    assert "kept 3 rows" in capsys.readouterr().out
    _same_predictions(read_jsonl(out), read_jsonl(reference))
    assert [p.name for p in out.parent.iterdir()] == ["preds.jsonl"]  # nothing left beside it


def test_resume_keeps_only_the_prefix_written_for_the_same_inputs(predict, wavs, tmp_path, scored, capsys):
    out = tmp_path / "preds.jsonl"
    assert predict("--out", out, *wavs[:3]) == 0
    before = out.read_bytes()
    scored.clear()
    # the same inputs: nothing to predict (the model is not even loaded), the output untouched
    assert predict("--out", out, "--resume", *wavs[:3]) == 0
    assert scored == [] and out.read_bytes() == before
    assert "nothing left to predict" in capsys.readouterr().out
    # the first two match, the third differs: those two kept, the rest predicted
    inputs = [wavs[0], wavs[1], wavs[4], wavs[2]]
    assert predict("--out", out, "--resume", *inputs) == 0
    assert scored == [inputs[2:]]
    assert out.read_bytes().splitlines()[:2] == before.splitlines()[:2]
    assert [r["input"] for r in read_jsonl(out)] == inputs
    # without --resume everything is predicted again
    scored.clear()
    assert predict("--out", out, *inputs) == 0
    assert scored == [inputs]


def test_resume_skips_a_torn_last_line(predict, wavs, tmp_path, monkeypatch, scored):
    out = tmp_path / "preds.jsonl"
    _interrupted(monkeypatch, predict, 2, "--out", out, *wavs)
    partial = [p for p in tmp_path.iterdir() if p.name != out.name]
    assert len(partial) == 1 and len(partial[0].read_bytes().splitlines()) == 2  # the rows written so far
    with open(partial[0], "ab") as f:
        f.write(b'{"input": "' + wavs[2].encode()[:10])  # the kill cut this line short
    scored.clear()
    assert predict("--out", out, "--resume", *wavs) == 0
    assert scored == [wavs[2:]]
    assert [r["input"] for r in read_jsonl(out)] == wavs


def test_resume_compares_a_manifests_keys_and_gold_labels(predict, wavs, tmp_path, scored):
    import json

    manifest = tmp_path / "m.jsonl"
    rows = [{"key": f"k{i}", "audio": w, "label": "joy"} for i, w in enumerate(wavs[:3])]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "preds.jsonl"
    assert predict("--out", out, "--manifest", manifest) == 0
    rows[1]["label"] = "anger"  # the gold label of the second row changed
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored.clear()
    assert predict("--out", out, "--manifest", manifest, "--resume") == 0
    assert scored == [wavs[1:3]]
    assert [r["gold"] for r in read_jsonl(out)] == ["joy", "anger", "joy"]


def test_temp_files_left_by_a_killed_run_are_removed(predict, wavs, tmp_path):
    out = tmp_path / "preds.jsonl"
    stale = tmp_path / ".preds.jsonl.999999999.0badc0de.tmp"  # no such process
    live = tmp_path / f".preds.jsonl.{os.getpid()}.0badc0de.tmp"  # a run still writing
    for path in (stale, live):
        path.write_text("half a row")
    assert predict("--out", out, wavs[0]) == 0
    assert not stale.exists() and live.exists()


# ------------------------------------------------------------------------------- killed for real (SIGKILL)
def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def _run_until(proc: subprocess.Popen, folder: Path, out: Path, before: bytes | None, rows: int, log: Path):
    """Wait until the run has written `rows` rows somewhere in `folder` (or changed `out`), then SIGKILL it."""
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            changed = out.exists() and out.read_bytes() != before
            if changed or any(_lines(p) >= rows for p in folder.iterdir() if p != out):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "predict ended before it could be interrupted:\n" + tail(log.read_bytes())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_predict_killed_mid_run_then_resumed_matches_an_uninterrupted_run(saved_model, wavs, tmp_path):
    inputs = [wavs[i % len(wavs)] for i in range(400)]
    reference = tmp_path / "reference.jsonl"
    assert cli(["predict", "--model", str(saved_model), "--device", "cpu", "--out", str(reference), *inputs]) == 0
    expected = read_jsonl(reference)

    folder = tmp_path / "preds"
    folder.mkdir()
    out = folder / "preds.jsonl"
    cmd = [sys.executable, "-m", "emoq.cli", "predict", "--model", str(saved_model), "--device", "cpu",
           "--out", str(out), *inputs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "killed.log"

    def start(*extra):
        with open(log, "wb") as handle:
            return subprocess.Popen([*cmd, *extra], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)

    # killed after some rows, then resumed: the rows written before the kill are kept
    _run_until(start(), folder, out, None, 64, log)
    assert not out.exists()
    resumed = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, f"--- stdout\n{tail(resumed.stdout)}\n--- stderr\n{tail(resumed.stderr)}"
    kept = int(resumed.stdout.split("kept ")[1].split()[0])
    assert 64 <= kept < len(inputs)
    _same_predictions(read_jsonl(out), expected)
    complete = out.read_bytes()
    assert [p.name for p in folder.iterdir()] == ["preds.jsonl"]

    # a run without --resume over that complete output, killed: the complete output is still there, whole
    _run_until(start(), folder, out, complete, 1, log)
    assert out.read_bytes() == complete
    again = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0 and "nothing left to predict" in again.stdout, tail(again.stderr)
    assert out.read_bytes() == complete
