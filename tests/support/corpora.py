"""Small corpora the training and evaluation tests learn from, and the tiny test config pointed at them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import soundfile as sf

from emoq.config import load_config
from emoq.recipes import find_shipped

from .media import MELD_CSV, MELD_FOLDERS, MELD_HEADER

#: the three labels of the tiny models; in a tone corpus the pitch of the tone gives the class
LABELS = ["neutral", "joy", "anger"]
TONES = {"neutral": 150.0, "joy": 400.0, "anger": 900.0}


def make_tone_corpus(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """A MELD-layout corpus whose class is the pitch of a tone (plus noise): learnable by listening."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        (root / MELD_FOLDERS[split]).mkdir(parents=True, exist_ok=True)
        with open(root / MELD_CSV[split], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(MELD_HEADER)
            row = 0
            for label, hz in TONES.items():
                for _ in range(n):
                    seconds = rng.uniform(0.9, 1.0)
                    t = np.arange(int(16000 * seconds)) / 16000
                    audio = 0.3 * np.sin(2 * np.pi * hz * rng.uniform(0.95, 1.05) * t) + 0.02 * rng.standard_normal(t.size)
                    sf.write(root / MELD_FOLDERS[split] / f"dia{row}_utt0.wav", audio.astype(np.float32), 16000)
                    w.writerow([row + 1, "okay then", "A", label, "neutral", row, 0, 1, 1, "00:00:00,000", "00:00:01,000"])
                    row += 1
    return root


def make_tone_corpus_pair(folder: Path, per_class: dict[str, int]) -> tuple[Path, Path]:
    """A tone corpus in the MELD layout (folder/meld) and the same clips as a `datasets` folder (folder/hf, splits
    train and validation): one corpus through both readers."""
    from emoq.data.hf import write_hf_dataset
    from emoq.data.meld import read_meld

    root = make_tone_corpus(folder / "meld", per_class)
    hf = write_hf_dataset({"train": read_meld(root, "train"), "validation": read_meld(root, "dev")}, folder / "hf")
    return root, hf


def tiny_test_config(corpus, out, *overrides, name: str = "emoq/tiny_test"):
    """The shipped tiny config (random tiny models) on `corpus`, writing into `out`."""
    return load_config(find_shipped(name), [f"data.root={corpus}", f"trainer.output_dir={out}", *overrides])
