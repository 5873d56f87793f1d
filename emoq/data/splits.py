"""The one place that turns (dataset, split) into utterances, for training and `emoq eval`.

MELD has official train / dev / test CSVs; a manifest is one JSONL file per split; a `datasets` dataset (hf) has
named splits of its own (the caller passes the dataset's name for the split); IEMOCAP is
leave-one-session-out: `test` is the held-out session `fold`, and `dev` is carved out of the training
sessions by a hash of the key (`dev_fraction`), so model selection never looks at the test session
(`dev_fraction=0` selects on the held-out session, as some papers do: a test-set leak, only for
reproducing them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from .records import DatasetError, UtteranceList

DATASETS = ("meld", "iemocap", "manifest", "hf")
SPLITS = ("train", "dev", "test")
#: the label set a dataset is read with when none is named
DEFAULT_LABEL_SETS = {"meld": "meld7", "iemocap": "iemocap4"}


def read_split(dataset: str, split: str, *, root: str | Path | None = None, manifest: str | Path | None = None,
               label_set: str | None = None, fold: int = 5, dev_fraction: float = 0.1,
               hf: Mapping | None = None) -> UtteranceList:
    """Every utterance of `split` ('train', 'dev', 'test') of `dataset`, in corpus order, none filtered out
    (rows whose audio is unusable are there, for the caller to report). `hf`: for dataset hf, the keyword
    arguments of :func:`emoq.data.hf.read_hf` besides the split and label set (path, name, revision, columns,
    label_map)."""
    label_set = label_set or DEFAULT_LABEL_SETS.get(dataset)
    if dataset == "hf":
        from .hf import read_hf

        if not (hf or {}).get("path"):
            raise DatasetError("dataset hf: no dataset path given (a Hub id, a save_to_disk folder, an "
                               "audiofolder-style folder or data files)")
        return read_hf(split=split, label_set=label_set or "meld7", **hf)
    if split not in SPLITS and dataset != "meld":  # MELD's reader knows its own aliases (valid, val, ...)
        raise DatasetError(f"dataset {dataset}: unknown split '{split}' (expected one of {', '.join(SPLITS)})")
    if dataset == "manifest":
        from .manifest import read_manifest

        if not manifest:
            raise DatasetError(f"dataset manifest: no manifest file given for split '{split}'")
        return read_manifest(manifest, label_set=label_set)
    if not root:
        raise DatasetError(f"dataset {dataset}: no corpus root folder given")
    if dataset == "meld":
        from .meld import read_meld

        return read_meld(root, split, label_set=label_set)
    if dataset != "iemocap":
        raise DatasetError(f"unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")
    from .iemocap import read_iemocap

    utterances = read_iemocap(root, protocol=label_set)
    test_session = f"Session{fold}"
    if split == "test" or (split == "dev" and dev_fraction == 0):
        chosen = [u for u in utterances if u.split == test_session]
    else:
        chosen = [u for u in utterances if u.split != test_session
                  and held_out_for_dev(u.key, dev_fraction) == (split == "dev")]
    return UtteranceList(chosen, source=utterances.source, excluded=utterances.excluded,
                         warnings=utterances.warnings)


def split_source(dataset: str, split: str, *, manifest: str | Path | None = None, fold: int = 5,
                 path: str | None = None) -> str:
    """How a results file names what was read: 'meld:test', 'iemocap:Session5', 'manifest:PATH',
    'hf:PATH[split]'."""
    if dataset == "manifest":
        return f"manifest:{manifest}"
    if dataset == "hf":
        return f"hf:{path}[{split}]"
    if dataset == "iemocap":
        return f"iemocap:Session{fold}" if split == "test" else f"iemocap:{split} (Session{fold} held out)"
    return f"{dataset}:{split}"


def held_out_for_dev(key: str, fraction: float) -> bool:
    """Whether utterance `key` belongs to the dev part carved out of a corpus' training data: decided by
    a hash of the key alone, so every run, process and Python gets the same split."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
