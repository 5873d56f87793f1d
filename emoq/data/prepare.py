"""Convert a corpus once into 16 kHz mono wavs + one JSONL manifest per split (the library side of `emoq prepare`).

    emoq prepare meld --root MELD.Raw --out data/meld16k --workers 4
    emoq prepare iemocap --root IEMOCAP_full_release --out data/iemocap16k [--protocol iemocap_patamia4]
    emoq prepare manifest --root my_corpus.jsonl --out data/mine16k
    emoq prepare hf --path DIR_OR_HUB_ID --out data/mine16k [--split test] [--audio-column speech ...]

What it guarantees:

- **No row lost.** ``OUT/<split>.jsonl`` has exactly one line per input row (MELD: per CSV row;
  IEMOCAP: per utterance the protocol uses, the excluded labels are counted in the summary), in
  input order, with ``key, split, dialogue_id, utterance_id, speaker, text, label, audio,
  duration, status, error`` (+ ``source`` = the original media file, ``truncated``,
  ``source_duration`` and the corpus' extra fields). A clip that is missing, empty, corrupt,
  not audio, NaN-filled or too short gets ``"status": "error"``, ``"audio": null`` and a readable
  ``error`` that names the file; training skips those rows and says how many.
- **Decoded once, in parallel**: a process pool decodes every clip (wav/flac/mp3 via soundfile,
  mp4 via PyAV), writes each wav atomically (temp file + rename) at 16-bit PCM.
- **Resumable**: a second run decodes nothing that is already done, even after the first was killed
  (Ctrl-C, SIGKILL, a lost node). Each clip's result (``status``, ``duration``, ``truncated``,
  ``source_duration``, ``error``) is appended to ``OUT/.emoq_prepare.progress.jsonl`` as soon as it
  is decoded, one whole line written and synced to disk at a time, and the rerun reads it back, so
  its manifests are row for row those of an uninterrupted run. A wav is kept when it is valid
  (16 kHz mono, long enough) and its recorded source is unchanged (same path, size and mtime:
  ``source_stat``); a failed row is kept while its source file is unchanged, and retried once the
  file appears or changes. A wav whose result was not recorded yet (killed in between) is decoded
  again. ``--overwrite`` decodes everything again, and so does changing ``--max-seconds`` or
  ``--min-seconds`` (recorded in ``OUT/.emoq_prepare.json``).
- **Nothing left behind by a kill**: the decoding workers end with the process that started them
  (they watch it), and the temp files a killed run leaves are removed by the next one. One run at a
  time writes into a folder (``OUT/.emoq_prepare.lock``); a second one stops with a message.
- **Deterministic**: the manifest does not depend on ``--workers``.
- Long clips are kept whole unless ``--max-seconds`` is given; truncations are listed.
- Exit status is non-zero only when not a single clip converted.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import SAMPLE_RATE, is_stored_clip
from ..files import append_line_durably, atomic_write_text
from .records import DatasetError, Utterance
from .splits import DATASETS

__all__ = ["prepare", "PrepareReport"]

logger = logging.getLogger("emoq.data.prepare")

STATE_FILE = ".emoq_prepare.json"
PROGRESS_FILE = ".emoq_prepare.progress.jsonl"
LOCK_FILE = ".emoq_prepare.lock"
_STATE_VERSION = 1
#: the names `emoq.files.atomic_path` gives its temp files: .NAME.PID.HEX8.tmp
_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@dataclass
class PrepareReport:
    """What :func:`prepare` did. ``exit_code`` is 1 only when nothing converted."""

    dataset: str
    out: Path
    manifests: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> Counter(ok=, error=)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (key, message)
    truncated: list[tuple[str, float | None]] = field(default_factory=list)  # (key, source seconds)
    excluded: Counter = field(default_factory=Counter)  # raw labels a protocol leaves out
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    decoded: int = 0  # clips decoded by this run
    reused: int = 0  # rows taken from an earlier run: valid wavs + failures whose source is unchanged

    @property
    def ok(self) -> int:
        return sum(c["ok"] for c in self.counts.values())

    @property
    def error(self) -> int:
        return sum(c["error"] for c in self.counts.values())

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    @property
    def exit_code(self) -> int:
        return 0 if self.ok > 0 else 1

    def summary(self, max_errors: int = 20) -> str:
        lines = [f"emoq prepare {self.dataset} -> {self.out}"]
        for split, c in self.counts.items():
            lines.append(
                f"  {split}: {c['ok'] + c['error']} rows, {c['ok']} ok, {c['error']} error -> {self.manifests[split]}"
            )
        lines.append(
            f"  total: {self.ok} ok, {self.error} error, {self.hours:.2f} hours of audio "
            f"(decoded {self.decoded}, reused {self.reused} from an earlier run)"
        )
        if self.excluded:
            lines.append("  excluded by protocol: " + ", ".join(f"{k} {v}" for k, v in sorted(self.excluded.items())))
        if self.truncated:
            shown = ", ".join(k for k, _ in self.truncated[:max_errors])
            more = f" ... and {len(self.truncated) - max_errors} more" if len(self.truncated) > max_errors else ""
            lines.append(f"  truncated to --max-seconds: {len(self.truncated)} clip(s): {shown}{more}")
        for note in self.warnings:
            lines.append(f"  note: {note}")
        if self.errors:
            lines.append(f"  errors ({len(self.errors)}):")
            for key, message in self.errors[:max_errors]:
                lines.append(f"    {key}: {message}")
            if len(self.errors) > max_errors:
                lines.append(
                    f"    ... and {len(self.errors) - max_errors} more (every one is in the manifests, "
                    f"\"status\": \"error\")"
                )
        return "\n".join(lines)


# --------------------------------------------------------------------------- gathering rows
def _gather(dataset, root: Path, splits, label_set, protocol,
            hf: dict | None = None) -> tuple[dict[str, list[Utterance]], Counter, list[str]]:
    """-> ({split: utterances in input order}, excluded counter, reader notes)."""
    if dataset == "meld":
        from .meld import MELD_SPLITS, _canonical_split, read_meld

        if splits:
            wanted = [_canonical_split(s) for s in splits]
        else:
            wanted = [s for s in MELD_SPLITS if (root / MELD_SPLITS[s][0]).is_file()]
            if not wanted:
                raise DatasetError(f"{root}: no MELD CSV found (expected {', '.join(v[0] for v in MELD_SPLITS.values())})")
        out, notes = {}, []
        for split in wanted:
            rows = read_meld(root, split, label_set=label_set or "meld7")
            out[split] = list(rows)
            notes.extend(rows.warnings)
        return out, Counter(), notes
    if dataset == "iemocap":
        from .iemocap import read_iemocap

        sessions = None
        if splits:
            sessions = []
            for s in splits:
                m = re.fullmatch(r"(?:session)?\s*(\d)", str(s).strip().lower())
                if not m:
                    raise ValueError(f"IEMOCAP splits are sessions (Session1..Session5 or 1..5), got {s!r}")
                sessions.append(int(m.group(1)))
        rows = read_iemocap(root, protocol=protocol or "iemocap4", sessions=sessions)
        return rows.by_split(), Counter(rows.excluded), list(rows.warnings)
    if dataset == "manifest":
        from .manifest import read_manifest

        files = [root] if root.is_file() else sorted(root.glob("*.jsonl"))
        if not files:
            raise DatasetError(f"{root}: no manifest (.jsonl) found")
        out = {}
        for f in files:
            if splits and f.stem not in splits:
                continue
            for u in read_manifest(f, label_set=label_set):
                out.setdefault(u.split, []).append(u)
        if splits:
            missing = [s for s in splits if s not in out]
            if missing:
                raise DatasetError(f"{root}: no rows for split(s) {missing}")
        return out, Counter(), []
    if dataset == "hf":
        return _gather_hf(root, splits, label_set, hf or {}), Counter(), []
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def _gather_hf(path, splits, label_set, hf: dict) -> dict[str, list[Utterance]]:
    """The named splits of a `datasets` dataset, or those of train / validation / test it has."""
    from .hf import MissingSplitError, read_hf

    out = {}
    for split in splits or ("train", "validation", "test"):
        try:
            out[split] = list(read_hf(str(path), split, label_set=label_set or "meld7", **hf))
        except MissingSplitError:
            if splits:  # a split the user named must exist
                raise
            # a default split that is not there: prepare the others
    if not out:
        raise DatasetError(f"{path}: none of the splits train, validation, test; name them with --split")
    return out


def _safe(name: str) -> str:
    """A file-name-safe version of a key or split name."""
    return re.sub(r"[^\w.\-]+", "_", name.replace("/", "__")).strip("._") or "utt"


def _wav_name(key: str, split: str) -> str:
    return _safe(key[len(split) + 1 :] if key.startswith(split + "/") else key)


# --------------------------------------------------------------------------- the worker
def _convert(job: tuple) -> dict:
    """Decode one source file and write the 16 kHz wav. Runs in a pool worker; never raises."""
    src, dst, sr, max_seconds, min_seconds = job
    from ..audio import AudioError, load_audio, write_wav

    audio_logger = logging.getLogger("emoq.audio")
    level = audio_logger.level
    audio_logger.setLevel(logging.ERROR)  # truncations are reported by the parent, once
    try:
        if src is None:
            return {"status": "error", "error": "no audio path in the input row"}
        audio, info = load_audio(src, sr=sr, max_seconds=max_seconds, min_seconds=min_seconds, return_info=True)
        write_wav(dst, audio, sr)
        return {
            "status": "ok",
            "duration": len(audio) / sr,
            "truncated": info.truncated,
            "source_duration": info.source_duration,
        }
    except AudioError as exc:
        return {"status": "error", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a report row, not a crash of the whole run
        return {"status": "error", "error": f"{src}: unexpected {type(exc).__name__}: {exc}"}
    finally:
        audio_logger.setLevel(level)


def _valid_wav(dst: Path, src, sr: int, min_seconds: float, max_seconds: float | None) -> float | None:
    """Duration of an existing, usable wav from an earlier run (None: decode again)."""
    try:
        import soundfile as sf

        info = sf.info(str(dst))
    except Exception:  # noqa: BLE001 - unreadable: decode again
        return None
    if info.samplerate != sr or info.channels != 1 or info.frames <= 0:
        return None
    duration = info.frames / sr
    if duration < min_seconds or (max_seconds is not None and duration > max_seconds + 1e-6):
        return None
    try:
        if src is not None and not is_stored_clip(src) and os.stat(src).st_mtime > dst.stat().st_mtime:
            return None  # the source changed after the wav was written
    except OSError:
        pass
    return duration


def _source_stat(src) -> list | None:
    """[size, mtime_ns] of a source file (None: missing), or a stored clip's fingerprint (a row of a `datasets`
    dataset): a clip is decoded again when this changes."""
    if is_stored_clip(src):
        return [src.fingerprint]
    try:
        st = os.stat(src)
    except (OSError, TypeError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _end_with_pool_owner() -> None:
    """Pool worker initializer: the worker exits as soon as the process that started the pool is gone, even
    when that one was killed by SIGKILL and could not shut the pool down (no orphan decoders left running).

    A worker's direct parent is the forkserver, which itself lives until every worker has exited, so a
    parent-death signal (PR_SET_PDEATHSIG) or a getppid() check would never fire; the pipe multiprocessing
    keeps open from the pool's owner to each worker (`parent_process().sentinel`) closes when the owner
    dies, whatever killed it, on every start method."""
    owner = multiprocessing.parent_process()
    if owner is not None:
        threading.Thread(target=_exit_after, args=(owner,), name="emoq-owner-watch", daemon=True).start()


def _exit_after(owner) -> None:
    owner.join()  # returns when the owner's end of the pipe closes: it has exited
    os._exit(1)


def _run_jobs(jobs: list[tuple], workers: int, progress, on_result: Callable[[int, dict], None] | None = None
              ) -> list[dict]:
    """Every job's result, in job order; `on_result(i, result)` as each one arrives (to record it at once)."""
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    bar = tqdm(total=len(jobs), desc="decoding", unit="clip", disable=None if progress is None else not progress)
    results: list[dict] = []

    def done(result: dict) -> None:
        if on_result is not None:
            on_result(len(results), result)
        results.append(result)
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done(_convert(job))
        else:
            chunksize = max(1, min(16, len(jobs) // (workers * 8)))
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                       initializer=_end_with_pool_owner)
            try:
                for result in pool.map(_convert, jobs, chunksize=chunksize):
                    done(result)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # an interrupted run does not decode the rest
                raise
            pool.shutdown()
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------- main entry
def prepare(
    dataset: str,
    root,
    out,
    splits: list[str] | None = None,
    workers: int = 2,
    max_seconds: float | None = None,
    min_seconds: float = 0.1,
    label_set: str | None = None,
    protocol: str = "iemocap4",
    overwrite: bool = False,
    progress: bool | None = None,
    quiet: bool = False,
    hf: dict | None = None,
) -> PrepareReport:
    """Convert ``dataset`` (``"meld"``, ``"iemocap"``, ``"manifest"`` or ``"hf"``) under ``root`` into
    ``out/wav/<split>/*.wav`` + ``out/<split>.jsonl``. See the module doc for the guarantees.

    ``splits``: MELD ``train``/``dev``/``test`` (default: every CSV present), IEMOCAP
    ``Session1``..``Session5`` (default: all), manifest file stems, the `datasets` dataset's split names
    (default: those of train / validation / test it has). ``label_set``: MELD label set (default ``meld7``),
    or a set to normalise manifest or dataset labels through. ``protocol``: IEMOCAP protocol. ``overwrite``:
    decode everything again. ``progress``: a progress bar (default: when stderr is a terminal). ``quiet``: do
    not print the summary. ``hf``: for ``"hf"`` (``root`` is then the dataset's path or Hub id), the column
    and label mapping (``columns``, ``label_map``, ``name``, ``revision``; see :func:`emoq.data.hf.read_hf`).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    root, out = Path(root), Path(out)
    if dataset != "hf" and not root.exists():  # a `datasets` path may be a Hub id or a file pattern
        raise DatasetError(f"{root}: not found")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if dataset == "manifest" and (root if root.is_dir() else root.parent).resolve() == out.resolve():
        raise ValueError("--out must differ from the folder of the input manifests (they would be overwritten)")
    workers = max(1, int(workers))

    by_split, excluded, notes = _gather(dataset, root, splits, label_set, protocol, hf)
    out.mkdir(parents=True, exist_ok=True)
    with _only_run_in(out):
        _remove_stale_temp_files(out)
        state = {"version": _STATE_VERSION, "sample_rate": SAMPLE_RATE, "max_seconds": max_seconds,
                 "min_seconds": min_seconds, "subtype": "PCM_16"}
        reuse = not overwrite and _same_settings(out, state)
        report = PrepareReport(dataset=dataset, out=out, excluded=excluded, warnings=notes)
        recorded = _read_progress(out / PROGRESS_FILE) if reuse else {}
        earlier = _previous_rows(out, by_split) if reuse else {}
        plans, jobs, reused = _plan(by_split, out, recorded, earlier, reuse, min_seconds, max_seconds)
        results = _decode(out, jobs, recorded, workers, progress, max_seconds, min_seconds)
        report.decoded, report.reused = len(jobs), len(reused)
        for split, plan in plans.items():
            _write_split(report, out, split, plan, {**reused, **results}, recorded)
        _write_progress(out / PROGRESS_FILE, recorded)  # compact: one line per row

    for key, seconds in report.truncated:
        logger.warning("%s: truncated from %s to max_seconds=%g s", key,
                       f"{seconds:.1f} s" if seconds else "?", max_seconds)
    if not quiet:
        print(report.summary())
    return report


@dataclass
class _Job:
    """A clip to decode: the row it is for, where its wav goes and its source's stat before decoding."""

    split: str
    index: int
    utterance: Utterance
    dst: Path
    source_stat: list[int] | None


def _plan(by_split, out: Path, recorded: dict, earlier: dict, reuse: bool, min_seconds: float,
          max_seconds: float | None) -> tuple[dict[str, list[tuple[Utterance, Path]]], list[_Job], dict]:
    """-> ({split: [(utterance, wav path)]}, clips to decode, {(split, i): result carried over})."""
    plans: dict[str, list[tuple[Utterance, Path]]] = {}
    jobs: list[_Job] = []
    reused: dict[tuple[str, int], dict] = {}
    for split, utterances in by_split.items():
        used: set[str] = set()
        plan = []
        for i, u in enumerate(utterances):
            name = _wav_name(u.key, split)
            if name in used:
                n = 2
                while f"{name}-{n}" in used:
                    n += 1
                name = f"{name}-{n}"
            used.add(name)
            dst = out / "wav" / _safe(split) / f"{name}.wav"
            plan.append((u, dst))
            stat = _source_stat(u.audio)
            result = None
            if reuse:
                entry = recorded.get((split, u.key))
                result = (_recorded_result(entry, u, out, dst, stat, min_seconds, max_seconds) if entry is not None
                          else _earlier_result(earlier.get(u.key, {}), u, dst, stat, min_seconds, max_seconds))
            if result is not None:
                reused[(split, i)] = result
            else:
                jobs.append(_Job(split, i, u, dst, stat))
        plans[split] = plan
    return plans, jobs, reused


def _recorded_result(entry: dict, u: Utterance, out: Path, dst: Path, stat, min_seconds: float,
                     max_seconds: float | None) -> dict | None:
    """The result the progress file recorded for this row, if it still holds (None: decode again): the same
    source, unchanged since, and for a converted clip its wav still valid."""
    if entry.get("wav") != _relative(dst, out) or entry.get("source") != _source(u) or entry.get("source_stat") != stat:
        return None
    if entry.get("status") == "error":
        return {"status": "error", "error": entry.get("error")}
    duration = _valid_wav(dst, u.audio, SAMPLE_RATE, min_seconds, max_seconds)
    if entry.get("status") != "ok" or duration is None:
        return None
    return {"status": "ok", "duration": duration, "truncated": bool(entry.get("truncated")),
            "source_duration": entry.get("source_duration")}


def _earlier_result(old: dict, u: Utterance, dst: Path, stat, min_seconds: float,
                    max_seconds: float | None) -> dict | None:
    """A result from the manifest of a run that kept no progress file (an emoq before it did), if it holds."""
    if old.get("status") == "ok" and dst.is_file():
        duration = _valid_wav(dst, u.audio, SAMPLE_RATE, min_seconds, max_seconds)
        if duration is not None:
            return {"status": "ok", "duration": duration, "truncated": bool(old.get("truncated", False)),
                    "source_duration": old.get("source_duration")}
    if old.get("status") == "error" and old.get("source") == _source(u) and old.get("source_stat") == stat:
        return {"status": "error", "error": old.get("error")}  # same file, same failure
    return None


def _decode(out: Path, jobs: list[_Job], recorded: dict, workers: int, progress, max_seconds: float | None,
            min_seconds: float) -> dict[tuple[str, int], dict]:
    """Decode `jobs`, appending each result to the progress file as it arrives: whatever is decoded before a
    kill is known to the next run. -> {(split, i): result}."""
    path = out / PROGRESS_FILE
    _write_progress(path, recorded)  # whole lines only: the first append starts on a line of its own
    if not jobs:
        return {}
    args = [(j.utterance.audio, str(j.dst), SAMPLE_RATE, max_seconds, min_seconds) for j in jobs]
    with open(path, "a", encoding="utf-8", newline="\n") as log:

        def record(i: int, result: dict) -> None:
            entry = _progress_entry(out, jobs[i], result)
            append_line_durably(log, json.dumps(entry, ensure_ascii=False) + "\n")
            recorded[(jobs[i].split, jobs[i].utterance.key)] = entry

        results = _run_jobs(args, workers, progress, on_result=record)
    return {(j.split, j.index): r for j, r in zip(jobs, results)}


def _write_split(report: PrepareReport, out: Path, split: str, plan, results: dict, recorded: dict) -> None:
    """Write `split`'s manifest (one row per input row, in input order) and count it in `report`."""
    from .manifest import write_manifest

    rows, counts = [], Counter(ok=0, error=0)
    for i, (u, dst) in enumerate(plan):
        result = results[(split, i)]
        row = {
            "key": u.key, "split": u.split, "dialogue_id": u.dialogue_id, "utterance_id": u.utterance_id,
            "speaker": u.speaker, "text": u.text, "label": u.label,
            "audio": str(dst) if result["status"] == "ok" else None,
            "duration": round(result["duration"], 6) if result["status"] == "ok" else None,
            "status": result["status"], "error": result.get("error"),
            "source": _source(u), "start": u.start, "end": u.end,
        }
        if result["status"] == "ok":
            row["truncated"] = result["truncated"]
            row["source_duration"] = result["source_duration"]
            report.seconds += result["duration"]
            if result["truncated"]:
                report.truncated.append((u.key, result["source_duration"]))
        else:
            row["source_stat"] = _source_stat(u.audio)
            report.errors.append((u.key, result["error"]))
        for k, v in u.extra.items():
            if k not in row and k not in ("audio_missing", "status", "error", "duration"):
                row[k] = v
        counts[result["status"]] += 1
        rows.append(row)
        if (split, u.key) not in recorded:  # carried over from an older manifest: recorded from now on
            recorded[(split, u.key)] = _progress_entry(out, _Job(split, i, u, dst, _source_stat(u.audio)), result)
    report.manifests[split] = write_manifest(rows, out / f"{_safe(split)}.jsonl", relative_paths=True)
    report.counts[split] = counts


# --------------------------------------------------------------------------- what a rerun reads back
def _same_settings(out: Path, state: dict) -> bool:
    """Record this run's decoding settings in OUT/.emoq_prepare.json; False when an earlier run used other
    ones (its wavs are not what this run would write: every clip is decoded again)."""
    path = out / STATE_FILE
    same = True
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != state:
            logger.warning("%s: settings changed since the last run (%s -> %s); decoding every clip again",
                           out, previous, state)
            same = False
    atomic_write_text(path, json.dumps(state, indent=1) + "\n")
    return same


def _relative(dst: Path, out: Path) -> str:
    return dst.relative_to(out).as_posix()


def _progress_entry(out: Path, job: _Job, result: dict) -> dict:
    """One line of the progress file: which row, its wav, its source as it was before decoding, the result."""
    u = job.utterance
    return {"split": job.split, "key": u.key, "wav": _relative(job.dst, out), "source": _source(u),
            "source_stat": job.source_stat, **result}


def _source(u: Utterance) -> str | None:
    """How a manifest names a row's original media: its path, or a stored clip's name (dataset, split, key)."""
    return None if u.audio is None else str(u.audio)



def _read_progress(path: Path) -> dict[tuple[str, str], dict]:
    """The results the progress file recorded, by (split, key), the latest line winning. A last line cut
    short by a kill (no newline at its end, or not JSON) is skipped."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    recorded: dict[tuple[str, str], dict] = {}
    for line in data.split(b"\n")[:-1]:  # what follows the last newline is a torn line or nothing
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "split" in entry and "key" in entry:
            recorded[(str(entry["split"]), str(entry["key"]))] = entry
    return recorded


def _write_progress(path: Path, recorded: dict) -> None:
    """Rewrite the progress file with one whole line per recorded row (atomically: a kill keeps the old one)."""
    atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in recorded.values()))


@contextmanager
def _only_run_in(out: Path):
    """Hold OUT/.emoq_prepare.lock while this run writes into `out`: a second `emoq prepare` into the same
    folder stops with a message instead of racing this one (and the temp files this run finds are known to be
    left over from a killed run). The lock goes with the process, however it ends."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"{out}: another `emoq prepare` is writing into this folder; "
                               "wait for it to finish (or use another --out)") from None
        yield


def _remove_stale_temp_files(out: Path) -> int:
    """Remove the half-written temp files (wavs, manifests) a killed run left in `out`; -> how many."""
    n = 0
    for path in [*out.glob(".*.tmp"), *(out / "wav").glob("*/.*.tmp")]:
        if _TEMP_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            n += 1
    if n:
        logger.info("%s: removed %d temp file(s) left by an interrupted run", out, n)
    return n


def _previous_rows(out: Path, plans) -> dict[str, dict]:
    """Rows of the manifests an earlier run wrote, by key: what a run that kept no progress file left."""
    rows: dict[str, dict] = {}
    for split in plans:
        path = out / f"{_safe(split)}.jsonl"
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(row, dict) and "key" in row:
                        rows[str(row["key"])] = row
        except OSError:
            continue
    return rows
