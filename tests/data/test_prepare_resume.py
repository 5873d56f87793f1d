"""emoq prepare, interrupted: a rerun gives the manifest an uninterrupted run gives, row for row (the metadata
of every clip already decoded survives the kill), no decoding worker outlives the run, no temp file is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.environment import tail
from support.media import TEXT_BYTES, build_meld_tree, good_mp4, good_wav, read_jsonl, write_tone

import emoq.data.prepare as prepare_mod
from emoq.data.prepare import prepare
from emoq.data.records import DatasetError

REPO = Path(__file__).resolve().parents[2]
MAX_SECONDS = 1.0


def _text(stem):
    stem.with_suffix(".wav").write_bytes(TEXT_BYTES)


# long clips are cut to MAX_SECONDS (truncated, source_duration = the original length), short ones kept whole
ENTRIES = [
    (0, 0, "joy", "long wav", good_wav(1.6)),
    (0, 1, "anger", "short wav", good_wav(0.5)),
    (0, 2, "neutral", "long 44.1 kHz stereo", good_wav(2.2, 44100, 2)),
    (0, 3, "joy", "missing", None),
    (1, 0, "sadness", "long mp4", good_mp4(1.5)),
    (1, 1, "fear", "text bytes", _text),
    (1, 2, "joy", "short mp4", good_mp4(0.6)),
    (1, 3, "anger", "long again", good_wav(3.0)),
    (2, 0, "neutral", "short again", good_wav(0.8)),
    (2, 1, "surprise", "last long", good_wav(1.2, 22050)),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_meld_tree(tmp_path_factory.mktemp("meld"), {"train": ENTRIES})


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The manifest of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    rows = read_jsonl(out / "train.jsonl")
    assert sum(r.get("truncated") is True for r in rows) == 5 and sum(r["status"] == "error" for r in rows) == 2
    return (out / "train.jsonl").read_bytes()


def _interrupted(monkeypatch, corpus, out, after: int) -> None:
    """A run killed right after its `after`-th clip was decoded and its wav written, before the run saw the
    result (the worst moment: a valid wav whose metadata nobody recorded)."""
    real, calls = prepare_mod._convert, []

    def convert_then_die(job):
        result = real(job)
        calls.append(job)
        if len(calls) == after:
            raise KeyboardInterrupt
        return result

    with monkeypatch.context() as patch:
        patch.setattr(prepare_mod, "_convert", convert_then_die)
        with pytest.raises(KeyboardInterrupt):
            prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    assert not (out / "train.jsonl").exists()  # interrupted before the manifest


def test_a_resumed_run_writes_the_manifest_of_an_uninterrupted_one(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(monkeypatch, corpus, out, after=6)
    report = prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    assert read_jsonl(out / "train.jsonl") == [json.loads(line) for line in reference.splitlines()]
    assert (out / "train.jsonl").read_bytes() == reference
    # the 5 results recorded before the kill are reused; the 6th clip's wav has no recorded metadata: decoded again
    assert (report.reused, report.decoded) == (5, len(ENTRIES) - 5)


def test_a_torn_last_progress_line_is_ignored_and_the_next_run_appends_after_it(corpus, reference, tmp_path,
                                                                              monkeypatch):
    out = tmp_path / "out"
    _interrupted(monkeypatch, corpus, out, after=3)
    progress = out / prepare_mod.PROGRESS_FILE
    whole = progress.read_bytes()
    assert whole.endswith(b"\n") and len(whole.splitlines()) == 2
    with open(progress, "ab") as f:
        f.write(whole.splitlines()[0][:25])  # a line cut short by the kill
    _interrupted(monkeypatch, corpus, out, after=4)
    report = prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    assert (out / "train.jsonl").read_bytes() == reference
    assert (report.reused, report.decoded) == (2 + 3, len(ENTRIES) - 5)
    # after a complete run the progress file holds one whole line per row
    lines = progress.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(ENTRIES)
    assert all(json.loads(line)["key"] for line in lines[:-1])


def test_a_changed_source_is_decoded_again_even_when_its_wav_is_newer(tmp_path):
    out = tmp_path / "out"
    root = tmp_path / "meld"
    build_meld_tree(root, {"train": ENTRIES[:2]})
    prepare("meld", root, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    source = root / "train_splits" / "dia0_utt0.wav"
    write_tone(source, 1.9)
    wav = out / "wav" / "train" / "dia0_utt0.wav"
    os.utime(wav, ns=(source.stat().st_mtime_ns + 10**9,) * 2)  # as if decoded after the change
    report = prepare("meld", root, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    assert report.decoded == 1
    row = read_jsonl(out / "train.jsonl")[0]
    assert row["truncated"] is True and row["source_duration"] == pytest.approx(1.9)


def test_temp_files_of_a_killed_run_are_removed_on_start(corpus, tmp_path):
    out = tmp_path / "out"
    prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    stale = [out / "wav" / "train" / ".dia0_utt0.wav.4242.0badc0de.tmp", out / ".train.jsonl.4242.deadbeef.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    kept = out / "wav" / "train" / ".notes.tmp"  # not one of ours
    kept.write_bytes(b"x")
    prepare("meld", corpus, out, workers=1, max_seconds=MAX_SECONDS, quiet=True)
    assert not any(path.exists() for path in stale)
    assert kept.exists()


def test_a_second_run_into_the_same_folder_at_the_same_time_is_refused(corpus, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / prepare_mod.LOCK_FILE, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DatasetError, match="another `emoq prepare`"):
            prepare("meld", corpus, out, workers=1, quiet=True)
    prepare("meld", corpus, out, workers=1, quiet=True)  # released: runs


# ------------------------------------------------------------------------------- killed for real (SIGKILL)
def _processes(pid: int) -> list:
    """Every process below `pid`: psutil handles (they notice a reused pid), else pids read from /proc."""
    try:
        import psutil
    except ImportError:
        return sorted(_proc_descendants(pid))
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _proc_descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(process) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps orphans here: it runs nothing)."""
    if isinstance(process, int):
        try:
            state = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process) -> str:
    if isinstance(process, int):
        try:
            cmdline = Path(f"/proc/{process}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            return f"{process}: {cmdline}"
        except OSError:
            return str(process)
    try:
        return f"{process.pid}: {' '.join(process.cmdline())}"
    except Exception:  # noqa: BLE001 - gone meanwhile
        return str(process.pid)


def _kill_all(proc: subprocess.Popen, below: list) -> None:
    """Test cleanup: the run this test started and whatever it started, by pid."""
    for p in [proc.pid, *(p if isinstance(p, int) else p.pid for p in below)]:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    proc.wait(timeout=30)


def _symlink_to(source: Path):
    return lambda stem: stem.with_suffix(".wav").symlink_to(source)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process tree read from /proc or psutil (Linux)")
def test_prepare_killed_mid_run_then_rerun_gives_the_uninterrupted_manifest(tmp_path):
    # 600 rows that take a few seconds to decode (44.1 kHz stereo to resample), a third of them cut
    sources = tmp_path / "sources"
    long = write_tone(sources / "long.wav", 3.0, 44100, 2)
    short = write_tone(sources / "short.wav", 1.5, 44100, 2, freq=330.0)
    (sources / "text.wav").write_bytes(TEXT_BYTES)
    entries = []
    for i in range(600):
        clip = (None if i % 97 == 5 else _symlink_to(sources / "text.wav") if i % 89 == 7
                else _symlink_to(long if i % 3 == 0 else short))
        entries.append((i // 10, i % 10, ("joy", "anger", "neutral")[i % 3], f"Clip {i}.", clip))
    root = build_meld_tree(tmp_path / "meld", {"train": entries})
    reference = tmp_path / "reference"
    prepare("meld", root, reference, workers=1, max_seconds=2.0, quiet=True)

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "emoq.cli", "prepare", "meld", "--root", str(root), "--out", str(out),
           "--workers", "2", "--max-seconds", "2", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    below: list = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / "wav" / "train").glob("*.wav"))) >= 60:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prepare ended before it could be interrupted:\n" + tail(
            (tmp_path / "killed.log").read_bytes())
        below = _processes(proc.pid)
        assert len(below) >= 2, "expected decoding workers below the prepare process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_running(p) for p in below):
            time.sleep(0.1)
        orphans = [_describe(p) for p in below if _running(p)]
        assert not orphans, "processes of the killed prepare still running:\n" + "\n".join(orphans)
    finally:
        _kill_all(proc, below)
        log.close()
    assert not (out / "train.jsonl").exists()  # killed before the manifest

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, f"--- stdout\n{tail(rerun.stdout)}\n--- stderr\n{tail(rerun.stderr)}"
    assert "reused 0 from" not in rerun.stdout  # the work done before the kill was kept
    got, expected = read_jsonl(out / "train.jsonl"), read_jsonl(reference / "train.jsonl")
    assert len(got) == len(expected) == 600
    for row, want in zip(got, expected):
        assert row == want, row["key"]
    assert sum(r.get("truncated") is True for r in got) > 150
    assert (out / "train.jsonl").read_bytes() == (reference / "train.jsonl").read_bytes()
    assert not [p for p in out.rglob("*.tmp")], "temp files left behind"
