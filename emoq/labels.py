"""Label sets: a fixed id order, aliases for raw corpus codes and free-text answers, prompt wording.

A :class:`LabelSet` is the single place that says which emotions a task has and in which order
(``id2label`` is what gets saved next to a model), how raw corpus codes map onto them
(``normalize("exc") -> "happy"`` for IEMOCAP-4) and how an LLM's free-text answer is read back
(``parse_free_text("The emotion is anger.") -> "anger"``).

Registered sets (see :data:`LABEL_SETS`):

- ``meld7``: neutral, surprise, fear, sadness, joy, disgust, anger (the MELD paper's order)
- ``meld_sentiment3``: neutral, positive, negative
- ``iemocap4``: neutral, happy, angry, sad (``exc`` merges into ``happy``)
- ``iemocap_patamia4``: angry, excited, neutral, sad (``hap`` is *not* part of this set)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

__all__ = [
    "UNMAPPED",
    "LabelSet",
    "UnknownLabelError",
    "UnknownLabelSetError",
    "LABEL_SETS",
    "get_label_set",
    "register_label_set",
]


#: what stands for an answer that names no label of the set: a generated answer that maps to none, or a
#: prediction outside the set (its own confusion-matrix column); scored as wrong, never dropped
UNMAPPED = "<unmapped>"


class UnknownLabelError(ValueError):
    """A raw label that the label set does not know (neither a label nor an alias)."""

    def __init__(self, value, label_set: LabelSet):
        self.value = value
        self.label_set = label_set
        super().__init__(
            f"unknown label {value!r} for label set {label_set.name!r}; "
            f"valid labels: {', '.join(label_set.labels)}"
        )


class UnknownLabelSetError(KeyError):
    """``get_label_set`` was asked for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


def _key(text: str) -> str:
    """Lower-case, trim, collapse inner whitespace/underscores/hyphens to one space."""
    return re.sub(r"[\s_\-]+", " ", str(text).strip().lower())


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of canonical labels plus aliases.

    ``labels`` fixes the id order (``labels[i]`` has id ``i``). ``aliases`` maps lower-case
    variants (raw corpus codes such as ``"exc"``, synonyms such as ``"happy"``) onto a canonical
    label; canonical labels always map onto themselves and need not be listed.
    """

    name: str
    labels: tuple[str, ...]
    aliases: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    description: str = ""

    def __post_init__(self):
        labels = tuple(str(label) for label in self.labels)
        if not labels:
            raise ValueError(f"label set {self.name!r} has no labels")
        if len(set(labels)) != len(labels):
            raise ValueError(f"label set {self.name!r} has duplicate labels: {labels}")
        if any(label != _key(label) for label in labels):
            raise ValueError(f"label set {self.name!r}: canonical labels must be lower-case words: {labels}")
        aliases = {}
        for alias, target in dict(self.aliases).items():
            if target not in labels:
                raise ValueError(f"label set {self.name!r}: alias {alias!r} points at unknown label {target!r}")
            aliases[_key(alias)] = target
        for label in labels:
            aliases[label] = label
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "aliases", MappingProxyType(aliases))

    # ------------------------------------------------------------------ ids
    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    def __contains__(self, label) -> bool:
        return label in self.labels

    # ------------------------------------------------------------ mapping
    def normalize(self, raw) -> str:
        """Canonical label for ``raw`` (a label, a raw corpus code or an alias), case-insensitive.

        Raises :class:`UnknownLabelError` naming the value and the valid labels.
        """
        if raw is None:
            raise UnknownLabelError(raw, self)
        label = self.aliases.get(_key(raw))
        if label is None:
            raise UnknownLabelError(raw, self)
        return label

    def is_known(self, raw) -> bool:
        return raw is not None and _key(raw) in self.aliases

    def encode(self, raw) -> int:
        """Id of ``raw`` after :meth:`normalize`."""
        return self.labels.index(self.normalize(raw))

    def decode(self, idx: int) -> str:
        return self.labels[int(idx)]

    @cached_property
    def _mention_pattern(self) -> re.Pattern:
        # Longest aliases first so "no emotion" wins over "emotion"-like shorter matches.
        words = sorted(self.aliases, key=len, reverse=True)
        alternatives = "|".join(r"\s+".join(map(re.escape, w.split(" "))) for w in words)
        return re.compile(rf"(?<![a-z])(?:{alternatives})(?![a-z])")

    def parse_free_text(self, text) -> str | None:
        """Map an LLM's free-text answer onto the label set, or ``None``.

        ``"Joy"``, ``"happy"``, ``"joyful"``, ``"The emotion is anger."``, ``"angry"`` all map
        (through the aliases). Returns ``None`` when no label is mentioned, or when mentions
        point at two different labels (``"neutral or sad"``: ambiguous, counted as unmappable
        rather than guessed).
        """
        if text is None:
            return None
        cleaned = _key(re.sub(r"[^\w\s\-]", " ", str(text)))
        if not cleaned:
            return None
        if cleaned in self.aliases:
            return self.aliases[cleaned]
        found = {self.aliases[_key(m)] for m in self._mention_pattern.findall(cleaned)}
        return found.pop() if len(found) == 1 else None

    # ------------------------------------------------------------- prompts
    def prompt_options(self, sep: str = ", ") -> str:
        """The labels in id order, for prompts: ``"neutral, surprise, fear, ..."``."""
        return sep.join(self.labels)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "labels": list(self.labels),
            "aliases": {k: v for k, v in self.aliases.items() if k != v},
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelSet:
        return cls(
            name=data["name"],
            labels=tuple(data["labels"]),
            aliases=dict(data.get("aliases") or {}),
            description=data.get("description", ""),
        )


def _aliases(groups: Mapping[str, Iterable[str]]) -> dict[str, str]:
    return {alias: label for label, names in groups.items() for alias in names}


MELD7 = LabelSet(
    name="meld7",
    labels=("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    aliases=_aliases(
        {
            "neutral": ["neu", "neutrality", "calm", "no emotion", "emotionless"],
            "surprise": ["sur", "surprised", "surprising", "astonished", "astonishment", "amazed",
                         "amazement", "shocked", "shock", "startled"],
            "fear": ["fea", "fearful", "afraid", "scared", "frightened", "terrified", "terror",
                     "anxious", "anxiety", "nervous", "worried", "panic"],
            "sadness": ["sad", "unhappy", "unhappiness", "sorrow", "sorrowful", "grief", "depressed",
                        "melancholy", "gloomy", "miserable"],
            "joy": ["hap", "happy", "happiness", "joyful", "joyous", "glad", "cheerful", "delighted",
                    "pleased", "excited", "excitement", "amused", "elated"],
            "disgust": ["dis", "disgusted", "disgusting", "revulsion", "revolted", "repulsed", "grossed out"],
            "anger": ["ang", "angry", "mad", "furious", "fury", "rage", "annoyed", "annoyance",
                      "irritated", "frustrated", "frustration", "irate"],
        }
    ),
    description="MELD 7-class emotion (official order: neutral, surprise, fear, sadness, joy, disgust, anger)",
)

MELD_SENTIMENT3 = LabelSet(
    name="meld_sentiment3",
    labels=("neutral", "positive", "negative"),
    aliases=_aliases(
        {
            "neutral": ["neu", "neutrality"],
            "positive": ["pos", "positive sentiment"],
            "negative": ["neg", "negative sentiment"],
        }
    ),
    description="MELD 3-class sentiment (the CSV's Sentiment column)",
)

IEMOCAP4 = LabelSet(
    name="iemocap4",
    labels=("neutral", "happy", "angry", "sad"),
    aliases=_aliases(
        {
            "neutral": ["neu", "neutrality", "calm"],
            "happy": ["hap", "exc", "excited", "excitement", "happiness", "joy", "joyful", "glad",
                      "cheerful", "delighted"],
            "angry": ["ang", "anger", "mad", "furious", "rage"],
            "sad": ["sadness", "unhappy", "sorrow", "depressed"],
        }
    ),
    description="IEMOCAP 4-class (neutral, happy+excited, angry, sad); 5,531 utterances, leave-one-session-out",
)

IEMOCAP_PATAMIA4 = LabelSet(
    name="iemocap_patamia4",
    labels=("angry", "excited", "neutral", "sad"),
    aliases=_aliases(
        {
            "angry": ["ang", "anger", "mad", "furious", "rage"],
            "excited": ["exc", "excitement", "thrilled", "enthusiastic"],
            "neutral": ["neu", "neutrality", "calm"],
            "sad": ["sadness", "unhappy", "sorrow", "depressed"],
        }
    ),
    description="IEMOCAP ang/exc/neu/sad as in Patamia et al. (Sessions 1-4 train, 5 test); never mixed with iemocap4",
)

#: name -> LabelSet of every registered label set.
LABEL_SETS: dict[str, LabelSet] = {}


def register_label_set(label_set: LabelSet, overwrite: bool = False) -> LabelSet:
    if label_set.name in LABEL_SETS and not overwrite:
        raise ValueError(f"label set {label_set.name!r} is already registered")
    LABEL_SETS[label_set.name] = label_set
    return label_set


for _ls in (MELD7, MELD_SENTIMENT3, IEMOCAP4, IEMOCAP_PATAMIA4):
    register_label_set(_ls)


def get_label_set(name: str | LabelSet) -> LabelSet:
    """The registered :class:`LabelSet` called ``name`` (a LabelSet passes through)."""
    if isinstance(name, LabelSet):
        return name
    try:
        return LABEL_SETS[str(name)]
    except KeyError:
        raise UnknownLabelSetError(f"unknown label set {name!r}; available: {', '.join(sorted(LABEL_SETS))}") from None
