"""The one record every reader returns: :class:`Utterance`, and the errors readers raise."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = ["Utterance", "UtteranceList", "DatasetError"]


class DatasetError(ValueError):
    """A corpus file that cannot be read as documented (bad CSV, unknown label, missing column...).

    The message always names the file and, where there is one, the row/line and the value.
    """


def raise_row_errors(errors: list[str], path, rows: str = "row") -> None:
    """A reader's rejected rows as one DatasetError that names the file and lists them (the first 20);
    nothing when there are none."""
    if len(errors) == 1:
        raise DatasetError(errors[0])
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise DatasetError(f"{len(errors)} bad {rows}(s) in {path}:\n  {shown}{more}")


@dataclass
class Utterance:
    """One utterance of any corpus.

    - ``key``: unique within the corpus (MELD: ``"train/dia0_utt0"``; IEMOCAP: the utterance id).
    - ``split``: the split or session it belongs to (``"train"``, ``"Session1"``...).
    - ``audio``: path of the audio file (may not exist: readers report missing clips, they do not
      drop the row; ``None`` only for rows of a prepared manifest whose conversion failed).
    - ``label``: canonical label of the reader's label set, or ``None`` when unlabeled.
    - ``start`` / ``end``: where the utterance sits in its source recording (episode, dialogue),
      in seconds. Informational: ``audio`` is already the utterance's own clip.
    - ``extra``: corpus-specific fields (MELD ``sentiment``, IEMOCAP ``raw_label``, ``vad``...).
    """

    key: str
    split: str
    audio: str | None
    label: str | None
    text: str | None = None
    speaker: str | None = None
    dialogue_id: str | None = None
    utterance_id: str | None = None
    start: float | None = None
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``extra`` stays nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Utterance:
        """Inverse of :meth:`to_dict`; unknown top-level keys are merged into ``extra``."""
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names and k != "extra"}
        extra = dict(data.get("extra") or {})
        extra.update({k: v for k, v in data.items() if k not in names})
        known.setdefault("split", "")
        known.setdefault("label", None)
        if "key" not in known or "audio" not in known:
            raise KeyError(f"an Utterance needs 'key' and 'audio', got keys {sorted(data)}")
        return cls(**known, extra=extra)


class UtteranceList(list):
    """A ``list[Utterance]`` that also carries what the reader noticed.

    - ``source``: the file or folder read.
    - ``excluded``: ``Counter`` of raw labels left out *by protocol* (IEMOCAP ``fru``, ``xxx``...).
    - ``warnings``: human-readable notes (cp1252 bytes decoded, clips missing on disk...).
    """

    def __init__(self, items=(), source: str | None = None, excluded: Counter | None = None,
                 warnings: list[str] | None = None):
        super().__init__(items)
        self.source = source
        self.excluded: Counter = Counter(excluded or {})
        self.warnings: list[str] = list(warnings or [])

    def label_counts(self) -> Counter:
        return Counter(u.label for u in self)

    def by_split(self) -> dict[str, list[Utterance]]:
        out: dict[str, list[Utterance]] = {}
        for u in self:
            out.setdefault(u.split, []).append(u)
        return out
