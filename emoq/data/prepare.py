"""Convert a corpus once into 16 kHz mono wavs + one JSONL manifest per split (the library side of `emoq prepare`).

    emoq prepare meld --root MELD.Raw --out data/meld16k --workers 4
    emoq prepare iemocap --root IEMOCAP_full_release --out data/iemocap16k [--protocol iemocap_patamia4]
    emoq prepare manifest --root my_corpus.jsonl --out data/mine16k

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
- **Resumable**: a second run decodes nothing that is already done. It keeps every wav that
  exists, is valid (16 kHz mono, long enough) and is newer than its source, and every failed row
  whose source file is unchanged (same path, size and mtime: ``source_stat`` in the error row); a
  failed clip is retried once its file appears or changes. ``--overwrite`` decodes everything
  again, and so does changing ``--max-seconds`` or ``--min-seconds`` (recorded in
  ``OUT/.emoq_prepare.json``).
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
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..audio import SAMPLE_RATE
from ..files import atomic_write_text
from .records import DatasetError, Utterance
from .splits import DATASETS

__all__ = ["prepare", "PrepareReport"]

logger = logging.getLogger("emoq.data.prepare")

STATE_FILE = ".emoq_prepare.json"
_STATE_VERSION = 1


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
def _gather(dataset, root: Path, splits, label_set, protocol) -> tuple[dict[str, list[Utterance]], Counter, list[str]]:
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
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


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
        if src is not None and os.stat(src).st_mtime > dst.stat().st_mtime:
            return None  # the source changed after the wav was written
    except OSError:
        pass
    return duration


def _source_stat(src) -> list[int] | None:
    """[size, mtime_ns] of a source file (None: missing): a failed clip is retried when this changes."""
    try:
        st = os.stat(src)
    except (OSError, TypeError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _run_jobs(jobs: list[tuple], workers: int, progress) -> list[dict]:
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    bar = tqdm(total=len(jobs), desc="decoding", unit="clip", disable=None if progress is None else not progress)
    results: list[dict] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(_convert(job))
                bar.update(1)
        else:
            chunksize = max(1, min(16, len(jobs) // (workers * 8)))
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                for result in pool.map(_convert, jobs, chunksize=chunksize):
                    results.append(result)
                    bar.update(1)
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
) -> PrepareReport:
    """Convert ``dataset`` (``"meld"``, ``"iemocap"`` or ``"manifest"``) under ``root`` into
    ``out/wav/<split>/*.wav`` + ``out/<split>.jsonl``. See the module doc for the guarantees.

    ``splits``: MELD ``train``/``dev``/``test`` (default: every CSV present), IEMOCAP
    ``Session1``..``Session5`` (default: all), manifest file stems. ``label_set``: MELD label set
    (default ``meld7``), or a set to normalise manifest labels through. ``protocol``: IEMOCAP
    protocol. ``overwrite``: decode everything again. ``progress``: a progress bar (default: when
    stderr is a terminal). ``quiet``: do not print the summary.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    root, out = Path(root), Path(out)
    if not root.exists():
        raise DatasetError(f"{root}: not found")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    if dataset == "manifest" and (root if root.is_dir() else root.parent).resolve() == out.resolve():
        raise ValueError("--out must differ from the folder of the input manifests (they would be overwritten)")
    workers = max(1, int(workers))

    by_split, excluded, notes = _gather(dataset, root, splits, label_set, protocol)
    out.mkdir(parents=True, exist_ok=True)
    state = {"version": _STATE_VERSION, "sample_rate": SAMPLE_RATE, "max_seconds": max_seconds,
             "min_seconds": min_seconds, "subtype": "PCM_16"}
    state_path = out / STATE_FILE
    reuse = not overwrite
    if reuse and state_path.is_file():
        try:
            previous = json.loads(state_path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != state:
            logger.warning("%s: settings changed since the last run (%s -> %s); decoding every clip again",
                           out, previous, state)
            reuse = False
    atomic_write_text(state_path, json.dumps(state, indent=1) + "\n")

    report = PrepareReport(dataset=dataset, out=out, excluded=excluded, warnings=notes)
    previous_rows = _previous_rows(out, by_split) if reuse else {}
    plans: dict[str, list[tuple[Utterance, Path]]] = {}
    jobs: list[tuple] = []
    job_index: dict[tuple[str, int], int] = {}
    reused: dict[tuple[str, int], dict] = {}  # results carried over from the earlier run
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
            old = previous_rows.get(u.key, {})
            duration = _valid_wav(dst, u.audio, SAMPLE_RATE, min_seconds, max_seconds) if reuse and dst.is_file() else None
            if duration is not None:
                reused[(split, i)] = {"status": "ok", "duration": duration, "truncated": bool(old.get("truncated", False)),
                                      "source_duration": old.get("source_duration")}
            elif (old.get("status") == "error" and old.get("source") == u.audio
                  and old.get("source_stat") == _source_stat(u.audio)):
                reused[(split, i)] = {"status": "error", "error": old.get("error")}  # same file, same failure
            else:
                job_index[(split, i)] = len(jobs)
                jobs.append((u.audio, str(dst), SAMPLE_RATE, max_seconds, min_seconds))
        plans[split] = plan

    results = _run_jobs(jobs, workers, progress) if jobs else []
    report.decoded, report.reused = len(jobs), len(reused)

    for split, plan in plans.items():
        rows, counts = [], Counter(ok=0, error=0)
        for i, (u, dst) in enumerate(plan):
            result = reused.get((split, i)) or results[job_index[(split, i)]]
            row = {
                "key": u.key, "split": u.split, "dialogue_id": u.dialogue_id, "utterance_id": u.utterance_id,
                "speaker": u.speaker, "text": u.text, "label": u.label,
                "audio": str(dst) if result["status"] == "ok" else None,
                "duration": round(result["duration"], 6) if result["status"] == "ok" else None,
                "status": result["status"], "error": result.get("error"),
                "source": u.audio, "start": u.start, "end": u.end,
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
        from .manifest import write_manifest

        report.manifests[split] = write_manifest(rows, out / f"{_safe(split)}.jsonl", relative_paths=True)
        report.counts[split] = counts

    for key, seconds in report.truncated:
        logger.warning("%s: truncated from %s to max_seconds=%g s", key,
                       f"{seconds:.1f} s" if seconds else "?", max_seconds)
    if not quiet:
        print(report.summary())
    return report


def _previous_rows(out: Path, plans) -> dict[str, dict]:
    """Rows of the manifests an earlier run wrote, by key (``truncated`` info and failures carry over)."""
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
