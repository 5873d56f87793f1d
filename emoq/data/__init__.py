"""Corpus readers (MELD CSV, IEMOCAP EmoEvaluation, JSONL manifest) -> one :class:`Utterance` record.

Importing ``emoq.data`` is cheap: readers, ``prepare`` and the samplers (which need torch) load on
first attribute access. (``prepare`` is not re-exported here because ``emoq.data.prepare`` is the
module: use ``from emoq.data.prepare import prepare``.)
"""

from __future__ import annotations

import importlib

from .records import DatasetError, Utterance, UtteranceList

_LAZY = {
    "read_meld": "meld",
    "MELD_SPLITS": "meld",
    "read_iemocap": "iemocap",
    "leave_one_session_out_folds": "iemocap",
    "IEMOCAP_PROTOCOLS": "iemocap",
    "split_by_sessions": "iemocap",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "load_manifest_dataset": "manifest",
    "build_demo_corpus": "demo_corpus",
    "read_split": "splits",
    "held_out_for_dev": "splits",
    "LengthGroupedBatchSampler": "sampling",
    "ClassBalancedSampler": "sampling",
}

__all__ = ["DatasetError", "Utterance", "UtteranceList", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'emoq.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
