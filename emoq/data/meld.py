"""MELD reader: ``{split}_sent_emo.csv`` + clip folders -> ``list[Utterance]`` in CSV order.

Layout (the official ``MELD.Raw`` release)::

    ROOT/train_sent_emo.csv   ROOT/train_splits/dia{D}_utt{U}.mp4
    ROOT/dev_sent_emo.csv     ROOT/dev_splits_complete/dia{D}_utt{U}.mp4
    ROOT/test_sent_emo.csv    ROOT/output_repeated_splits_test/dia{D}_utt{U}.mp4

(``ROOT/<split>/<folder>/`` is accepted too, as some archives unpack that way.)

Loading is driven by the CSV, never by a directory listing: every CSV row becomes one
:class:`Utterance`, also when its clip is missing on disk (``audio`` is then the expected ``.mp4``
path and ``extra["audio_missing"]`` is ``True``; ``emoq prepare`` reports it as an error row).

Clip choice: a ``dia{D}_utt{U}.wav`` next to the official ``.mp4`` name is preferred (an
audio-only copy, faster to decode; the demo corpus ships only wavs); then ``.mp4``; then
``.flac``/``.m4a``/``.mp3``/``.ogg``.

Text decoding (the CSVs that circulate are not all clean UTF-8): a UTF-8 BOM is stripped, CRLF and
LF both work (RFC-4180 quoting, via :mod:`csv`), bytes that are not valid UTF-8 are decoded as
cp1252 with a logged warning, and C1 control characters (U+0080-U+009F, what cp1252 punctuation
becomes after a latin-1 round trip) are mapped with cp1252's meaning: ``\\x92`` -> ``’``,
``\\x93``/``\\x94`` -> ``“``/``”``, ``\\x96``/``\\x97`` -> ``–``/``—``, ``\\x85`` -> ``…`` — the same
characters the current official CSVs use — so old and new copies give identical text.

Structural problems raise :class:`~emoq.data.records.DatasetError` naming the file, the row (and
physical line) and the value: a missing required column, an unknown emotion label, a
non-integer ``Dialogue_ID``/``Utterance_ID``, a short row, a duplicate ``(Dialogue_ID,
Utterance_ID)``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

from ..labels import LabelSet, UnknownLabelError, get_label_set
from .records import DatasetError, Utterance, UtteranceList, raise_row_errors

__all__ = ["read_meld", "MELD_SPLITS", "MELD_COLUMNS", "decode_csv_bytes", "clip_path", "meld_csv_path"]

logger = logging.getLogger("emoq.data.meld")

#: split -> (CSV file name, clip folder name) of the official release.
MELD_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train_sent_emo.csv", "train_splits"),
    "dev": ("dev_sent_emo.csv", "dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
_SPLIT_ALIASES = {"valid": "dev", "validation": "dev", "val": "dev"}

#: The official column order.
MELD_COLUMNS = (
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment",
    "Dialogue_ID", "Utterance_ID", "Season", "Episode", "StartTime", "EndTime",
)
_REQUIRED = ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")
#: which CSV column holds the label for a label set (anything else reads ``Emotion``).
_LABEL_COLUMN = {"meld_sentiment3": "Sentiment"}
_CLIP_EXTENSIONS = (".wav", ".mp4", ".flac", ".m4a", ".mp3", ".ogg")

# C1 control characters -> what cp1252 means by the same byte (undefined ones are dropped).
_C1_MAP = {}
for _code in range(0x80, 0xA0):
    try:
        _C1_MAP[_code] = bytes([_code]).decode("cp1252")
    except UnicodeDecodeError:
        _C1_MAP[_code] = None


def _canonical_split(split: str) -> str:
    split = _SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if split not in MELD_SPLITS:
        raise ValueError(f"unknown MELD split {split!r}; expected one of {', '.join(MELD_SPLITS)}")
    return split


def meld_csv_path(root, split: str) -> Path:
    return Path(root) / MELD_SPLITS[_canonical_split(split)][0]


def _clip_dir(root: Path, split: str) -> Path:
    folder = MELD_SPLITS[split][1]
    for candidate in (root / folder, root / split / folder, root / split):
        if candidate.is_dir():
            return candidate
    return root / folder


def clip_path(clip_dir: Path, dialogue_id: int, utterance_id: int) -> tuple[Path, bool]:
    """-> (path of the clip for this row, whether it exists). See the module doc for the order."""
    stem = f"dia{dialogue_id}_utt{utterance_id}"
    for ext in _CLIP_EXTENSIONS:
        candidate = clip_dir / f"{stem}{ext}"
        if candidate.is_file():
            return candidate, True
    return clip_dir / f"{stem}.mp4", False


def decode_csv_bytes(raw: bytes, name: str = "<csv>") -> tuple[str, list[str]]:
    """Bytes of a CSV -> (text, warnings). See the module doc for the rules."""
    notes: list[str] = []
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text, bad_lines, count = _decode_mixed(raw)
        shown = ", ".join(map(str, bad_lines[:10])) + (" ..." if len(bad_lines) > 10 else "")
        note = f"{name}: {count} byte(s) are not valid UTF-8 (lines {shown}); decoded them as cp1252"
        logger.warning(note)
        notes.append(note)
    if any(0x80 <= ord(ch) < 0xA0 for ch in text):
        c1 = sum(1 for ch in text if 0x80 <= ord(ch) < 0xA0)
        text = text.translate(_C1_MAP)
        note = f"{name}: mapped {c1} C1 control character(s) to their cp1252 punctuation"
        logger.info(note)
        notes.append(note)
    return text, notes


def _decode_mixed(raw: bytes) -> tuple[str, list[int], int]:
    """UTF-8 where valid, cp1252 (latin-1 for its 5 undefined bytes) for every invalid byte."""
    out: list[str] = []
    bad_lines: list[int] = []
    count = 0
    pos = 0
    decoder = re.compile(rb"[\x00-\x7f]+|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
                         rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}"
                         rb"|\xf4[\x80-\x8f][\x80-\xbf]{2}")
    n = len(raw)
    while pos < n:
        m = decoder.match(raw, pos)
        if m:
            out.append(m.group().decode("utf-8"))
            pos = m.end()
            continue
        byte = raw[pos : pos + 1]
        try:
            out.append(byte.decode("cp1252"))
        except UnicodeDecodeError:
            out.append(byte.decode("latin-1"))
        line = raw.count(b"\n", 0, pos) + 1
        if not bad_lines or bad_lines[-1] != line:
            bad_lines.append(line)
        count += 1
        pos += 1
    return "".join(out), bad_lines, count


def _parse_time(value: str) -> float | None:
    """``"00:16:16,059"`` -> 976.059 (None when empty or malformed)."""
    m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2})(?:[,.](\d+))?\s*", value or "")
    if not m:
        return None
    h, mi, s, frac = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + (float(f"0.{frac}") if frac else 0.0)


def _header_index(header: list[str]) -> dict[str, int]:
    """Canonical column name -> position; tolerant of case, spaces and a stray BOM."""

    def norm(name: str) -> str:
        return re.sub(r"[\s_.]+", "", name.replace("\ufeff", "")).lower()

    wanted = {norm(c): c for c in MELD_COLUMNS}
    index: dict[str, int] = {}
    for i, name in enumerate(header):
        canonical = wanted.get(norm(name))
        if canonical and canonical not in index:
            index[canonical] = i
    return index


def read_meld(root, split: str, label_set: str | LabelSet = "meld7", csv_path=None) -> UtteranceList:
    """Read one MELD split. ``root`` holds the CSVs and clip folders; ``csv_path`` overrides the
    CSV location. Returns an :class:`~emoq.data.records.UtteranceList` (a list) in CSV order."""
    root = Path(root)
    split = _canonical_split(split)
    labels = get_label_set(label_set)
    path = Path(csv_path) if csv_path is not None else root / MELD_SPLITS[split][0]
    if not path.is_file():
        raise DatasetError(f"{path}: MELD annotation CSV not found (expected {MELD_SPLITS[split][0]} in {root})")
    text, notes = decode_csv_bytes(path.read_bytes(), str(path))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{path}: empty file, no header row") from None
    except csv.Error as exc:
        raise DatasetError(f"{path}: line 1: malformed CSV header ({exc})") from None
    col = _header_index(header)
    label_column = _LABEL_COLUMN.get(labels.name, "Emotion")
    required = list(dict.fromkeys((*_REQUIRED, label_column)))
    missing = [c for c in required if c not in col]
    if missing:
        raise DatasetError(
            f"{path}: missing required column(s) {', '.join(map(repr, missing))}; header has "
            f"{', '.join(map(repr, header))}"
        )

    clip_dir = _clip_dir(root, split)
    utterances = UtteranceList(source=str(path), warnings=notes)
    errors: list[str] = []
    seen: dict[tuple[int, int], int] = {}
    n_missing = 0
    row_no = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DatasetError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line: not a row
        row_no += 1
        where = f"{path}: row {row_no} (line {reader.line_num})"
        if len(row) < len(header):
            errors.append(f"{where}: has {len(row)} field(s), the header has {len(header)}")
            continue

        def cell(name: str, _row=row) -> str | None:
            i = col.get(name)
            return None if i is None else _row[i].strip()

        try:
            dia, utt = int(cell("Dialogue_ID")), int(cell("Utterance_ID"))
        except ValueError:
            errors.append(
                f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                f"{cell('Dialogue_ID')!r}/{cell('Utterance_ID')!r}"
            )
            continue
        if (dia, utt) in seen:
            errors.append(f"{where}: duplicate dia{dia}_utt{utt} (first seen in row {seen[(dia, utt)]})")
            continue
        seen[(dia, utt)] = row_no
        raw_label = cell(label_column)
        try:
            label = labels.normalize(raw_label)
        except UnknownLabelError:
            errors.append(
                f"{where}: unknown {label_column} label {raw_label!r} (dia{dia}_utt{utt}); "
                f"valid for {labels.name}: {labels.prompt_options()}"
            )
            continue
        audio, exists = clip_path(clip_dir, dia, utt)
        extra = {"csv_row": row_no}
        if not exists:
            extra["audio_missing"] = True
            n_missing += 1
        for name, key in (("Sentiment", "sentiment"), ("Emotion", "emotion"), ("Sr No.", "sr_no"),
                          ("Season", "season"), ("Episode", "episode"),
                          ("StartTime", "start_time"), ("EndTime", "end_time")):
            value = cell(name)
            if value is not None and not (name == label_column):
                extra[key] = value
        utterances.append(
            Utterance(
                key=f"{split}/dia{dia}_utt{utt}",
                split=split,
                audio=str(audio),
                label=label,
                text=cell("Utterance"),
                speaker=cell("Speaker"),
                dialogue_id=str(dia),
                utterance_id=str(utt),
                start=_parse_time(cell("StartTime") or ""),
                end=_parse_time(cell("EndTime") or ""),
                extra=extra,
            )
        )
    raise_row_errors(errors, path)
    if n_missing:
        note = f"{path}: {n_missing} of {len(utterances)} clip(s) not found under {clip_dir}"
        logger.warning(note)
        utterances.warnings.append(note)
    return utterances
