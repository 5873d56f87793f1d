"""`datasets` datasets as a corpus (`data.dataset: hf`, `emoq eval/predict/prepare --dataset hf`).

Where the data can be (`path`):

- a Hub id (``org/name``; `name` picks the configuration, `revision` pins a commit or tag);
- a folder written by ``save_to_disk`` (a ``DatasetDict``: its splits are the splits);
- an audiofolder-style folder: ``DIR/SPLIT/metadata.csv`` (or ``metadata.jsonl``) whose ``file_name`` column
  names the clip relative to that file; the clip path becomes the ``audio`` column. (The ``audiofolder``
  builder of ``datasets`` itself encodes every clip through torchcodec, which cannot be installed beside a
  CPU-only torch, so the metadata file is read with the ``csv`` / ``json`` builders instead; a folder
  without metadata, labelled by sub-folder names, is not read);
- data files: a path or glob pattern to parquet / arrow / csv / json(l) files, where ``{split}`` stands for
  the split's name (``data/{split}-*.parquet``).

Columns are mapped by :class:`~emoq.config.ColumnMap` (``audio``, ``label``, ``text`` must exist when named;
``speaker``, ``dialogue_id`` and ``key`` are read where present; a dataset without the key column numbers its
rows ``SPLIT/ROW``, counted from where a stream started). Labels: a ``ClassLabel`` id is read by its
name (never by position), then ``label_map`` renames it, then the label set normalises it; a label that is
none of the label set's is a :class:`DatasetError` naming the value, the rows and the valid labels.

Audio is never decoded by ``datasets`` (its decoder needs torchcodec): the audio column is cast to
``Audio(decode=False)`` and emoq's ``load_audio`` decodes what the row holds — a file path (audiofolder,
Hub caches of file-based datasets) or the encoded bytes (parquet, ``save_to_disk``). A row holding bytes
becomes a :class:`StoredClip` that reads them on demand, so a corpus on disk is memory-mapped, not loaded.
A row that cannot be decoded is reported by whoever loads it, with its key, like every other reader's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ColumnMap
from ..labels import LabelSet, UnknownLabelError, get_label_set
from .records import DatasetError, Utterance, UtteranceList, raise_row_errors

__all__ = ["open_split", "read_hf", "StoredClip", "utterance_stream", "RowConverter", "write_hf_dataset", "meld_to_hf"]

log = logging.getLogger("emoq.data.hf")

#: a split asked for by one name may be stored under another
_SPLIT_ALIASES = {"dev": ("validation", "valid", "val", "dev"), "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test",), "train": ("train",)}
_DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")


@dataclass(frozen=True)
class StoredClip:
    """A clip stored as bytes in row `index` of a dataset's audio column; ``load_audio`` reads it on demand.

    `table` is the dataset with the audio column alone (memory-mapped when the dataset is on disk; it pickles
    by reference to its files, so DataLoader workers reopen it rather than copy it)."""

    table: object = field(repr=False)
    column: str
    index: int
    name: str
    fingerprint: str

    def read_bytes(self) -> bytes:
        value = self.table[self.index][self.column]
        return (value or {}).get("bytes") or b""

    def __str__(self) -> str:
        return self.name


class MissingSplitError(DatasetError):
    """The dataset has no such split (the message lists the ones it has)."""


def _split_candidates(split: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((split, *_SPLIT_ALIASES.get(split, ()))))


def _pick_split(splits: Mapping, split: str, where: str):
    for name in _split_candidates(split):
        if name in splits:
            return name
    raise MissingSplitError(f"{where}: no split '{split}' (it has: {', '.join(splits) or 'none'})")


def _cast_audio(dataset, column: str):
    """The audio column with `datasets`' own decoding off (it needs torchcodec)."""
    from datasets import Audio

    feature = (dataset.features or {}).get(column)
    if isinstance(feature, Audio) and feature.decode:
        return dataset.cast_column(column, Audio(sampling_rate=feature.sampling_rate, decode=False))
    return dataset


def open_split(path: str, split: str, *, name: str | None = None, revision: str | None = None,
               streaming: bool = False, audio_column: str = "audio"):
    """One split of the dataset at `path` as a ``datasets.Dataset`` (an ``IterableDataset`` when `streaming`),
    its audio column not decoded. Returns ``(dataset, base)``: `base` is the folder relative clip paths are
    resolved against (audiofolder), else None."""
    import datasets

    folder = Path(path).expanduser()
    base = None
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            stored = datasets.load_from_disk(str(folder))
            if not isinstance(stored, datasets.DatasetDict):
                raise DatasetError(f"{folder}: holds one dataset without splits; save a DatasetDict "
                                   f"(DatasetDict(train=..., test=...).save_to_disk) so '{split}' can be found")
            dataset = stored[_pick_split(stored, split, str(folder))]
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, len(dataset.cache_files)))
        elif folder.is_dir():
            dataset, base = _metadata_folder(folder, split, streaming)
        elif any(ch in str(path) for ch in "*?{") or folder.suffix in _DATA_FILE_BUILDERS:
            files = str(path).replace("{split}", split)
            builder = _DATA_FILE_BUILDERS.get(Path(files).suffix)
            if builder is None:
                raise DatasetError(f"{path}: data files must end in {', '.join(_DATA_FILE_BUILDERS)}")
            dataset = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=streaming)
        else:
            dataset = _hub_split(path, split, name, revision, streaming)
    except DatasetError:
        raise
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DatasetError(f"{path}: cannot open split '{split}' ({type(err).__name__}: {err})") from None
    return _cast_audio(dataset, audio_column), base


def _hub_split(path: str, split: str, name, revision, streaming: bool):
    import datasets

    builder = datasets.load_dataset_builder(path, name, revision=revision)
    splits = builder.info.splits or {}
    chosen = _pick_split(splits, split, path) if splits else split
    return datasets.load_dataset(path, name, split=chosen, revision=revision, streaming=streaming)


def _metadata_folder(folder: Path, split: str, streaming: bool):
    import datasets

    for name in _split_candidates(split):
        for meta in _METADATA_FILES:
            file = folder / name / meta
            if file.is_file():
                builder = "csv" if file.suffix == ".csv" else "json"
                dataset = datasets.load_dataset(builder, data_files={"rows": str(file)}, split="rows",
                                                streaming=streaming)
                if "file_name" not in (dataset.column_names or []):
                    raise DatasetError(f"{file}: no 'file_name' column (it names each clip, relative to the file)")
                return dataset.rename_column("file_name", "audio"), file.parent
    found = sorted(p.parent.name for meta in _METADATA_FILES for p in folder.glob(f"*/{meta}"))
    raise MissingSplitError(f"{folder}: not a dataset folder with split '{split}': expected a save_to_disk "
                            f"folder (dataset_dict.json) or {folder}/{split}/metadata.csv|jsonl"
                            + (f" (splits found: {', '.join(found)})" if found else ""))


class RowConverter:
    """One dataset row -> one :class:`Utterance`: columns mapped, the label read by name and checked."""

    def __init__(self, features, columns: ColumnMap, label_set: str | LabelSet, label_map: Mapping[str, str],
                 source: str, split: str, base: Path | None = None):
        from datasets import ClassLabel

        self.columns, self.source, self.split, self.base = columns, source, split, base
        self.labels = get_label_set(label_set)
        self.label_map = dict(label_map or {})
        feature = (features or {}).get(columns.label) if columns.label else None
        self.label_names = feature.names if isinstance(feature, ClassLabel) else None

    def check_columns(self, names) -> None:
        """A mapped column the dataset lacks is named, with the columns it has."""
        c = self.columns
        wanted = {"audio": c.audio, "label": c.label, "text": c.text}
        missing = [f"{role} -> '{col}'" for role, col in wanted.items() if col and col not in names]
        if missing:
            raise DatasetError(f"{self.source} [{self.split}]: no column for {', '.join(missing)} (columns: "
                               f"{', '.join(names)}); map them with the column options (e.g. --audio-column, "
                               "data.columns.audio)")

    def label(self, value) -> str | None:
        if value is None or (self.label_names is not None and value == -1):
            return None
        raw = self.label_names[value] if self.label_names is not None else value
        raw = self.label_map.get(str(raw), raw)
        return self.labels.normalize(raw)

    def key(self, row: Mapping, index: int) -> str:
        key = row.get(self.columns.key) if self.columns.key else None  # no such column: numbered rows
        return str(key) if key is not None else f"{self.split}/{index}"

    def audio(self, value, index: int, key: str, stored: Callable[[int, str], object]):
        """A path (resolved against the metadata folder) or, for bytes, what `stored(index, name)` makes."""
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return stored(index, f"{self.source} [{self.split}] {key}"
                                     + (f" ({Path(value['path']).name})" if value.get("path") else ""))
            value = value.get("path")
        if not value:
            return None
        path = Path(str(value))
        return str(self.base / path if self.base is not None and not path.is_absolute() else path)

    def utterance(self, row: Mapping, index: int, audio) -> Utterance:
        c = self.columns

        def text(col):
            value = row.get(col) if col else None
            return None if value is None else str(value)

        return Utterance(key=self.key(row, index), split=self.split, audio=audio, label=self.label(row.get(c.label))
                         if c.label else None, text=text(c.text), speaker=text(c.speaker),
                         dialogue_id=text(c.dialogue_id), extra={"row": index})


def read_hf(path: str, split: str, *, name: str | None = None, revision: str | None = None,
            columns: ColumnMap | None = None, label_set: str | LabelSet = "meld7",
            label_map: Mapping[str, str] | None = None) -> UtteranceList:
    """Every row of one split as Utterances, in dataset order. Rows with an unknown label are collected and
    raised together (each with its key and value); rows whose audio is missing stay, for the caller to
    report."""
    columns = columns or ColumnMap()
    dataset, base = open_split(path, split, name=name, revision=revision, audio_column=columns.audio)
    convert = RowConverter(dataset.features, columns, label_set, label_map or {}, str(path), split, base)
    convert.check_columns(dataset.column_names)
    audio_only = dataset.select_columns([columns.audio])
    fingerprint = getattr(dataset, "_fingerprint", "")
    meta = dataset.remove_columns([columns.audio])

    def stored(index: int, clip_name: str) -> StoredClip:
        return StoredClip(audio_only, columns.audio, index, clip_name, f"{fingerprint}/{index}")

    out = UtteranceList(source=str(path))
    errors = []
    for index, (row, audio) in enumerate(zip(meta, _audio_values(audio_only, columns.audio))):
        try:
            key = convert.key(row, index)
            out.append(convert.utterance(row, index, convert.audio(audio, index, key, stored)))
        except (UnknownLabelError, IndexError, TypeError) as err:
            errors.append(f"{path} [{split}] row {index} ({convert.key(row, index)}): {_label_problem(err, convert)}")
    raise_row_errors(errors, f"{path} [{split}]")
    return out


def _audio_values(audio_only, column: str) -> Iterator:
    """The audio column's values with the bytes left in Arrow: only whether there are any, and the path."""
    data = audio_only.data.column(column)
    if str(data.type).startswith("struct"):
        import pyarrow.compute as pc

        has_bytes = pc.invert(pc.is_null(pc.struct_field(data, "bytes"))).to_pylist()
        paths = pc.struct_field(data, "path").to_pylist()
        for flag, path in zip(has_bytes, paths):
            yield {"bytes": flag, "path": path}
    else:
        yield from data.to_pylist()


def _label_problem(err: Exception, convert: RowConverter) -> str:
    if isinstance(err, UnknownLabelError):
        return f"{err}"
    return (f"label id out of range for its ClassLabel ({err})" if convert.label_names is not None
            else f"unusable label ({err})")


def utterance_stream(dataset, convert: RowConverter, audio_column: str) -> Iterator[Utterance]:
    """Rows of a streamed split as Utterances; a row's bytes travel with it (there is no table to point
    into), as a :class:`StoredClip` over that one row."""
    for index, row in enumerate(dataset):
        key = convert.key(row, index)
        audio = convert.audio(row.get(audio_column), index, key,
                              lambda i, clip_name, row=row: StoredClip([row], audio_column, 0, clip_name, ""))
        yield convert.utterance(row, index, audio)


def write_hf_dataset(splits: Mapping[str, list[Utterance]], out, label_set: str | LabelSet = "meld7") -> Path:
    """Utterances as a ``save_to_disk`` DatasetDict (one split per entry, e.g. ``validation`` for dev): the
    clips' bytes embedded in an ``audio`` column, ``label`` a ClassLabel of the label set, ``text``,
    ``speaker``, ``dialogue_id`` and ``key``. Written atomically; returns `out`."""
    import datasets

    from ..files import atomic_folder

    labels = get_label_set(label_set)
    features = datasets.Features({
        "key": datasets.Value("string"), "label": datasets.ClassLabel(names=list(labels.labels)),
        "text": datasets.Value("string"), "speaker": datasets.Value("string"),
        "dialogue_id": datasets.Value("string"),
    })
    parts = {}
    for split, utts in splits.items():
        table = {"key": [u.key for u in utts], "label": [labels.label2id[u.label] for u in utts],
                 "text": [u.text for u in utts], "speaker": [u.speaker for u in utts],
                 "dialogue_id": [u.dialogue_id for u in utts]}
        dataset = datasets.Dataset.from_dict(table, features=features)
        # an Audio column is added as {bytes, path} and cast (encoding through `datasets` needs torchcodec)
        clips = [{"bytes": Path(u.audio).read_bytes(), "path": Path(u.audio).name} for u in utts]
        dataset = dataset.add_column("audio", clips).cast_column("audio", datasets.Audio(decode=False))
        parts[split] = dataset
    out = Path(out)
    with atomic_folder(out) as tmp:
        datasets.DatasetDict(parts).save_to_disk(str(tmp))
    return out


def meld_to_hf(root, out, label_set: str = "meld7") -> Path:
    """A MELD-layout corpus (its train / dev / test) as a ``save_to_disk`` folder with the splits train /
    validation / test (the demo's `--format hf`)."""
    from .meld import read_meld

    splits = {"train": "train", "validation": "dev", "test": "test"}
    return write_hf_dataset({name: read_meld(root, split, label_set=label_set) for name, split in splits.items()},
                            out, label_set=label_set)
