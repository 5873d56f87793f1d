"""IEMOCAP reader and its two protocols (kept apart on purpose).

Layout (``IEMOCAP_full_release``)::

    ROOT/Session{N}/dialog/EmoEvaluation/<dialog>.txt          [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5, 2.5, 2.5]
    ROOT/Session{N}/dialog/transcriptions/<dialog>.txt         Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.
    ROOT/Session{N}/sentences/wav/<dialog>/<utterance>.wav

Protocols (``protocol=``):

- ``iemocap4`` (the standard one): neu -> neutral, hap + exc -> happy, ang -> angry, sad -> sad;
  5,531 utterances; 5-fold leave-one-session-out (:func:`leave_one_session_out_folds`).
- ``iemocap_patamia4`` (Patamia et al.): ang, exc, neu, sad (``hap`` is *not* merged and not
  used); Sessions 1-4 train, Session 5 test.

Utterances whose label a protocol does not use (fru, sur, fea, dis, oth, xxx, and hap for
patamia) are excluded *by protocol*: they are counted per raw label in the returned list's
``excluded`` counter and in a logged summary, never dropped without a trace. An utterance whose wav
is missing is still returned (``extra["audio_missing"] = True``). A line that looks like an
evaluation line but does not parse, an unknown emotion code or a duplicate utterance id raises
:class:`~emoq.data.records.DatasetError` naming the file and line.

``Utterance.split`` is ``"Session{N}"``; training and `emoq eval` pick a fold's train / dev / test utterances with
:func:`emoq.data.splits.read_split` (:func:`split_by_sessions` splits by sessions directly).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..labels import get_label_set
from .records import DatasetError, Utterance, UtteranceList

__all__ = [
    "read_iemocap",
    "IemocapProtocol",
    "IEMOCAP_PROTOCOLS",
    "IEMOCAP_CODES",
    "leave_one_session_out_folds",
    "split_by_sessions",
    "session_of",
]

logger = logging.getLogger("emoq.data.iemocap")

#: Every categorical code that appears in EmoEvaluation files.
IEMOCAP_CODES = frozenset({"neu", "hap", "exc", "ang", "sad", "fru", "sur", "fea", "dis", "oth", "xxx"})
SESSIONS = (1, 2, 3, 4, 5)


def leave_one_session_out_folds(sessions: Sequence[int] = SESSIONS) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``[(train_sessions, test_sessions), ...]``: one fold per session, that session held out."""
    sessions = tuple(sorted(set(int(s) for s in sessions)))
    return [(tuple(s for s in sessions if s != held), (held,)) for held in sessions]


@dataclass(frozen=True)
class IemocapProtocol:
    name: str
    label_set: str
    label_map: Mapping[str, str]  # raw EmoEvaluation code -> canonical label of ``label_set``
    folds: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    description: str = ""

    def __post_init__(self):
        labels = get_label_set(self.label_set)
        for code, label in self.label_map.items():
            if code not in IEMOCAP_CODES or label not in labels.labels:
                raise ValueError(f"protocol {self.name}: bad mapping {code!r} -> {label!r}")
        object.__setattr__(self, "label_map", MappingProxyType(dict(self.label_map)))


IEMOCAP_PROTOCOLS: dict[str, IemocapProtocol] = {
    "iemocap4": IemocapProtocol(
        name="iemocap4",
        label_set="iemocap4",
        label_map={"neu": "neutral", "hap": "happy", "exc": "happy", "ang": "angry", "sad": "sad"},
        folds=tuple(leave_one_session_out_folds()),
        description="neutral / happy+excited / angry / sad, 5-fold leave-one-session-out (WA and UA)",
    ),
    "iemocap_patamia4": IemocapProtocol(
        name="iemocap_patamia4",
        label_set="iemocap_patamia4",
        label_map={"ang": "angry", "exc": "excited", "neu": "neutral", "sad": "sad"},
        folds=(((1, 2, 3, 4), (5,)),),
        description="Patamia et al.: ang / exc / neu / sad, Sessions 1-4 train, Session 5 test",
    ),
}

_EVAL_LINE = re.compile(
    r"^\[\s*(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*\]\s+(?P<utt>\S+)\s+(?P<code>\S+)"
    r"(?:\s+\[(?P<vad>[^\]]*)\])?\s*$"
)
_TRANSCRIPT_LINE = re.compile(r"^(?P<utt>\S+)\s+\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]:\s?(?P<text>.*)$")


def session_of(utterance_id: str) -> int:
    m = re.match(r"Ses0*(\d+)", utterance_id)
    if not m:
        raise ValueError(f"not an IEMOCAP utterance id: {utterance_id!r}")
    return int(m.group(1))


def _get_protocol(protocol: str | IemocapProtocol) -> IemocapProtocol:
    if isinstance(protocol, IemocapProtocol):
        return protocol
    try:
        return IEMOCAP_PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(
            f"unknown IEMOCAP protocol {protocol!r}; available: {', '.join(IEMOCAP_PROTOCOLS)}"
        ) from None


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("%s: not valid UTF-8, decoded as cp1252", path)
        return raw.decode("cp1252", errors="replace")


def _read_transcripts(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    out = {}
    for line in _read_text(path).splitlines():
        m = _TRANSCRIPT_LINE.match(line.strip())
        if m:
            out[m.group("utt")] = m.group("text").strip()
    return out


def read_iemocap(
    root,
    protocol: str | IemocapProtocol = "iemocap4",
    sessions: Iterable[int] | None = None,
) -> UtteranceList:
    """Read IEMOCAP under ``root`` with a protocol's label map.

    ``sessions``: which sessions to read (default: all of 1-5 that exist; asking for a missing one
    raises). Returns an :class:`~emoq.data.records.UtteranceList` in session, file-name and file
    order, with ``.excluded`` counting the raw labels the protocol leaves out.
    """
    root = Path(root)
    proto = _get_protocol(protocol)
    if sessions is None:
        wanted = [s for s in SESSIONS if (root / f"Session{s}").is_dir()]
        absent = [s for s in SESSIONS if s not in wanted]
        if not wanted:
            raise DatasetError(f"{root}: no IEMOCAP Session1..Session5 folders found")
        if absent:
            logger.warning("%s: sessions %s not found; reading %s", root, absent, wanted)
    else:
        wanted = sorted(set(int(s) for s in sessions))
        for s in wanted:
            if not (root / f"Session{s}").is_dir():
                raise DatasetError(f"{root}: Session{s} not found")

    result = UtteranceList(source=str(root))
    seen: dict[str, str] = {}
    n_missing = 0
    for session in wanted:
        eval_dir = root / f"Session{session}" / "dialog" / "EmoEvaluation"
        if not eval_dir.is_dir():
            raise DatasetError(f"{eval_dir}: EmoEvaluation folder not found")
        files = sorted(p for p in eval_dir.glob("*.txt") if not p.name.startswith("."))
        if not files:
            raise DatasetError(f"{eval_dir}: no EmoEvaluation .txt files")
        for eval_file in files:
            dialog = eval_file.stem
            transcripts = _read_transcripts(root / f"Session{session}" / "dialog" / "transcriptions" / f"{dialog}.txt")
            wav_dir = root / f"Session{session}" / "sentences" / "wav" / dialog
            for line_no, line in enumerate(_read_text(eval_file).splitlines(), start=1):
                stripped = line.strip()
                if not stripped.startswith("["):
                    continue  # headers, blank lines, per-annotator "C-E1:" / "A-E1:" lines
                where = f"{eval_file}: line {line_no}"
                m = _EVAL_LINE.match(stripped)
                if not m:
                    raise DatasetError(f"{where}: cannot parse evaluation line {stripped[:120]!r}")
                utt, code = m.group("utt"), m.group("code").lower()
                if code not in IEMOCAP_CODES:
                    raise DatasetError(
                        f"{where}: unknown emotion code {m.group('code')!r} for {utt}; "
                        f"expected one of {', '.join(sorted(IEMOCAP_CODES))}"
                    )
                if utt in seen:
                    raise DatasetError(f"{where}: duplicate utterance {utt} (first in {seen[utt]})")
                seen[utt] = where
                label = proto.label_map.get(code)
                if label is None:
                    result.excluded[code] += 1
                    continue
                vad = None
                if m.group("vad"):
                    try:
                        vad = [float(x) for x in m.group("vad").split(",")]
                    except ValueError:
                        vad = None
                wav = wav_dir / f"{utt}.wav"
                extra = {"raw_label": code, "session": session, "dialog": dialog,
                         "method": "script" if "_script" in utt else "impro"}
                if vad is not None:
                    extra["vad"] = vad
                if not wav.is_file():
                    extra["audio_missing"] = True
                    n_missing += 1
                gender = utt.rsplit("_", 1)[-1][:1]
                result.append(
                    Utterance(
                        key=utt,
                        split=f"Session{session}",
                        audio=str(wav),
                        label=label,
                        text=transcripts.get(utt),
                        speaker=f"Ses{session:02d}_{gender}",
                        dialogue_id=dialog,
                        utterance_id=utt,
                        start=float(m.group("start")),
                        end=float(m.group("end")),
                        extra=extra,
                    )
                )
    counts = Counter(u.label for u in result)
    summary = (
        f"IEMOCAP {proto.name} (sessions {wanted}): {len(result)} utterances "
        f"({', '.join(f'{k} {counts[k]}' for k in get_label_set(proto.label_set).labels)}); "
        f"excluded by protocol: "
        + (", ".join(f"{k} {v}" for k, v in sorted(result.excluded.items())) or "none")
    )
    logger.info(summary)
    result.warnings.append(summary)
    if n_missing:
        note = f"{root}: {n_missing} of {len(result)} wav file(s) not found"
        logger.warning(note)
        result.warnings.append(note)
    return result


def split_by_sessions(
    utterances: Iterable[Utterance], train_sessions: Iterable[int], test_sessions: Iterable[int]
) -> tuple[list[Utterance], list[Utterance]]:
    """Partition utterances by session (from ``extra["session"]`` or the id). Raises if the two
    session sets overlap."""
    train_s, test_s = set(map(int, train_sessions)), set(map(int, test_sessions))
    if train_s & test_s:
        raise ValueError(f"train and test sessions overlap: {sorted(train_s & test_s)}")
    train, test = [], []
    for u in utterances:
        s = int(u.extra.get("session") or session_of(u.utterance_id or u.key))
        if s in train_s:
            train.append(u)
        elif s in test_s:
            test.append(u)
    return train, test
