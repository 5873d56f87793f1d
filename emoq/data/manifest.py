"""JSONL manifests: one JSON object per line, ``{"audio": ..., "label": ..., "text": ...}``.

Any corpus can be used through a manifest. Fields:

- ``audio`` (required, except on rows with ``"status": "error"`` written by ``emoq prepare``):
  a path; relative paths are resolved against the manifest's folder, so a prepared folder can be
  moved as a whole.
- ``label`` (optional; ``None`` = unlabeled), ``text``, ``key``, ``split``, ``speaker``,
  ``dialogue_id``, ``utterance_id``, ``start``, ``end``: the :class:`Utterance` fields.
- anything else (``duration``, ``status``, ``error``, ``sentiment``...) goes to ``extra``.

Bad JSON, a line that is not an object or a missing ``audio`` raise
:class:`~emoq.data.records.DatasetError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path

from ..files import atomic_folder, atomic_open
from ..labels import LabelSet, UnknownLabelError, get_label_set
from .records import DatasetError, Utterance, UtteranceList, raise_row_errors

__all__ = ["read_manifest", "write_manifest", "load_manifest_dataset", "DATASET_COLUMNS"]

logger = logging.getLogger("emoq.data.manifest")

_FIELDS = tuple(f.name for f in fields(Utterance) if f.name != "extra")
#: Columns of :func:`load_manifest_dataset` (paths, not decoded audio).
DATASET_COLUMNS = ("key", "split", "audio", "label", "text", "speaker", "dialogue_id", "utterance_id", "duration")


def _resolve(audio: str, base: Path) -> str:
    p = Path(os.path.expanduser(str(audio)))
    return str(p if p.is_absolute() else (base / p))


def read_manifest(path, split: str | None = None, label_set: str | LabelSet | None = None) -> UtteranceList:
    """Read a JSONL manifest into Utterances (file order).

    ``split``: default for rows without a ``split`` field (else the file's stem).
    ``label_set``: when given, labels are normalised through it (unknown label -> DatasetError).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    labels = get_label_set(label_set) if label_set is not None else None
    base = path.resolve().parent
    default_split = split if split is not None else path.stem
    out = UtteranceList(source=str(path))
    errors: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(row, dict):
                errors.append(f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            audio = row.get("audio")
            failed = row.get("status") == "error"
            if (audio is None or (isinstance(audio, str) and not audio.strip())) and not failed:
                errors.append(f"{where}: missing required field 'audio'")
                continue
            if audio is not None and not isinstance(audio, str):
                errors.append(f"{where}: 'audio' must be a path string, got {type(audio).__name__}")
                continue
            label = row.get("label")
            if labels is not None and label is not None:
                try:
                    label = labels.decode(label) if isinstance(label, int) else labels.normalize(label)
                except (UnknownLabelError, IndexError):
                    errors.append(f"{where}: unknown label {row.get('label')!r}; valid for {labels.name}: "
                                  f"{labels.prompt_options()}")
                    continue

            def opt_str(value):
                return None if value is None else str(value)

            extra = {k: v for k, v in row.items() if k not in _FIELDS}
            nested = extra.pop("extra", None)
            if isinstance(nested, Mapping):
                extra = {**nested, **extra}
            out.append(
                Utterance(
                    key=str(row.get("key") or f"{path.stem}/{line_no}"),
                    split=str(row.get("split") or default_split),
                    audio=None if audio is None else _resolve(audio, base),
                    label=label,
                    text=row.get("text"),
                    speaker=opt_str(row.get("speaker")),
                    dialogue_id=opt_str(row.get("dialogue_id")),
                    utterance_id=opt_str(row.get("utterance_id")),
                    start=row.get("start"),
                    end=row.get("end"),
                    extra=extra,
                )
            )
    raise_row_errors(errors, path, rows="line")
    return out


def _row_dict(row) -> dict:
    if isinstance(row, Utterance):
        d = row.to_dict()
        extra = d.pop("extra") or {}
        d.update({k: v for k, v in extra.items() if k not in d})
        return d
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"write_manifest() rows must be Utterances or dicts, got {type(row).__name__}")


def write_manifest(rows: Iterable, path, relative_paths: bool = True) -> Path:
    """Write rows (Utterances or dicts) as JSONL, atomically (temp file + rename).

    ``relative_paths``: audio paths inside the manifest's folder are written relative to it (the
    folder stays relocatable; :func:`read_manifest` resolves them back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    with atomic_open(path, "w") as f:
        for row in rows:
            d = _row_dict(row)
            audio = d.get("audio")
            if relative_paths and audio:
                try:
                    d["audio"] = Path(audio).resolve().relative_to(base).as_posix()
                except ValueError:
                    pass  # outside the manifest folder: keep as given
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


def load_manifest_dataset(path, skip_errors: bool = True, label_set: str | LabelSet | None = None,
                          cache_dir: str | os.PathLike | None = None):
    """A ``datasets.Dataset`` of paths (never decoded audio) from one or more manifests.

    Returns ``(dataset, n_skipped)``: with ``skip_errors`` the rows marked ``"status": "error"`` by
    ``emoq prepare`` are left out and counted (and a warning is logged). Columns:
    :data:`DATASET_COLUMNS` (+ ``label_id`` when ``label_set`` is given, + ``status``/``error``
    when error rows are kept). Decode audio with :func:`emoq.audio.load_audio` in ``.map()`` or the
    collator: ``datasets.Audio`` needs torchcodec, which does not import beside CPU torch.

    Cached like ``datasets.load_dataset``: the dataset is saved as Arrow under ``cache_dir`` (default
    ``$EMOQ_CACHE/datasets``), keyed by the manifests' bytes and locations and these arguments, and
    memory-mapped from there — a large manifest is parsed once, and ``.map()`` results are cached.
    """
    import datasets

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    for p in paths:
        if not Path(p).is_file():
            raise DatasetError(f"{p}: manifest not found")
    labels = get_label_set(label_set) if label_set is not None else None
    folder = _dataset_cache_folder(paths, skip_errors, labels, cache_dir)
    if (folder / _SKIPPED_FILE).is_file():
        skipped = json.loads((folder / _SKIPPED_FILE).read_text(encoding="utf-8"))["skipped"]
        dataset = datasets.load_from_disk(str(folder))
    else:
        dataset, skipped = _build_manifest_dataset(paths, skip_errors, labels)
        try:
            # a concurrent builder may have won, with identical content: keep its folder
            with atomic_folder(folder, keep_existing=True) as tmp:
                dataset.save_to_disk(str(tmp))
                (tmp / _SKIPPED_FILE).write_text(json.dumps({"skipped": skipped}), encoding="utf-8")
            dataset = datasets.load_from_disk(str(folder))
        except OSError as err:  # e.g. a read-only cache: the in-memory dataset still serves
            logger.warning("%s: dataset cache not written (%s); using it in memory", folder, err)
    if skipped:
        logger.warning("%s: skipped %d row(s) with status 'error' (see the 'error' field in the manifest)",
                       ", ".join(map(str, paths)), skipped)
    return dataset, skipped


_SKIPPED_FILE = "emoq_skipped.json"
_CACHE_FORMAT = 1  # bump when the columns or their meaning change: old cache entries are then ignored


def _dataset_cache_folder(paths, skip_errors: bool, labels: LabelSet | None, cache_dir) -> Path:
    import hashlib

    from ..hub import cache_dir as emoq_cache

    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(Path(p).resolve()).encode() + b"\0" + Path(p).read_bytes() + b"\0")
    label_spec = None if labels is None else [labels.name, list(labels.labels), sorted(labels.aliases.items())]
    digest.update(json.dumps([_CACHE_FORMAT, skip_errors, label_spec]).encode())
    root = Path(cache_dir) if cache_dir is not None else emoq_cache() / "datasets"
    return root / digest.hexdigest()[:32]


def _build_manifest_dataset(paths, skip_errors: bool, labels: LabelSet | None):
    import datasets

    columns: dict[str, list] = {c: [] for c in DATASET_COLUMNS}
    if not skip_errors:
        columns.update(status=[], error=[])
    skipped = 0
    for p in paths:
        for u in read_manifest(p, label_set=labels):
            status = u.extra.get("status", "ok")
            if status == "error" and skip_errors:
                skipped += 1
                continue
            duration = u.extra.get("duration")
            values = {
                "key": u.key, "split": u.split, "audio": u.audio, "label": u.label, "text": u.text,
                "speaker": u.speaker, "dialogue_id": u.dialogue_id, "utterance_id": u.utterance_id,
                "duration": None if duration is None else float(duration),
                "status": status, "error": u.extra.get("error"),
            }
            for c in columns:
                columns[c].append(values[c])
    if labels is not None:
        columns["label_id"] = [None if lab is None else labels.label2id[lab] for lab in columns["label"]]
    features = {c: datasets.Value("string") for c in columns}
    features["duration"] = datasets.Value("float64")
    if "label_id" in columns:
        features["label_id"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features)), skipped
