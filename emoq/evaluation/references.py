"""Simple references that say how much of a corpus's label each modality carries.

Three logistic regressions, fitted on one split and scored (weighted F1) on another:

- ``"prosody"``: :func:`prosody_features` of the audio alone — log-mel mean and standard deviation per
  bin, RMS level and duration; no pretrained model, so it hears *how* something is said (level,
  spectral tilt, pitch region, rate) and hardly *what*.
- ``"words"``: a bag of words of the transcript alone.
- ``"both"``: the two feature sets side by side (the prosody block scaled to unit norm, see below).

:func:`fit_score_references` takes rows, :func:`score_references` a MELD-layout corpus folder.

On the demo corpus (:mod:`emoq.data.demo_corpus`) the first two stay low and the third is near
perfect: a system has to fuse speech and text to do well there. They are also a floor for any
system scored on the same splits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from transformers.audio_utils import mel_filter_bank

from ..audio import SAMPLE_RATE, load_audio

__all__ = ["log_mel", "prosody_features", "fit_score_references", "score_references", "REFERENCES"]

REFERENCES = ("prosody", "words", "both")
N_MELS = 80
_WIN, _HOP, _N_FFT = 400, 160, 512  # 25 ms windows every 10 ms at 16 kHz


def log_mel(audio: np.ndarray, sr: int = SAMPLE_RATE, n_mels: int = N_MELS) -> np.ndarray:
    """Natural-log mel power spectrogram ``(frames, n_mels)``: 25 ms Hann windows, 10 ms hop."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size < _WIN:
        audio = np.pad(audio, (0, _WIN - audio.size))
    frames = np.lib.stride_tricks.sliding_window_view(audio, _WIN)[::_HOP] * np.hanning(_WIN)
    power = np.abs(np.fft.rfft(frames, n=_N_FFT)) ** 2
    filters = mel_filter_bank(num_frequency_bins=_N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=sr / 2, sampling_rate=sr, norm=None, mel_scale="htk")
    return np.log(power @ filters + 1e-10)


def prosody_features(paths: Iterable) -> np.ndarray:
    """One row per audio file: log-mel mean (80) and std (80) over frames, RMS level, duration (s)."""
    rows = []
    for path in paths:
        audio = load_audio(path, sr=SAMPLE_RATE)
        mel = log_mel(audio)
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
        rows.append(np.concatenate([mel.mean(0), mel.std(0), [rms, audio.size / SAMPLE_RATE]]))
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 2 * N_MELS + 2)


def _field(row, name: str):
    return row[name] if isinstance(row, dict) else getattr(row, name)


def fit_score_references(train_rows: Sequence, test_rows: Sequence) -> dict[str, float]:
    """Fit the three references on ``train_rows`` and return their weighted F1 on ``test_rows``.

    Rows are :class:`~emoq.data.records.Utterance` objects (what :func:`emoq.data.meld.read_meld`
    returns) or dicts, with ``audio`` (a path), ``text`` and ``label``. Returns
    ``{"prosody": f1, "words": f1, "both": f1}``; deterministic for the same rows.
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    y_train = [_field(r, "label") for r in train_rows]
    y_test = [_field(r, "label") for r in test_rows]
    pro_train = prosody_features(_field(r, "audio") for r in train_rows)
    pro_test = prosody_features(_field(r, "audio") for r in test_rows)
    scaler = StandardScaler().fit(pro_train)
    pro_train, pro_test = (sparse.csr_matrix(scaler.transform(x)) for x in (pro_train, pro_test))
    # In "both", the standardised prosody block is scaled to unit expected squared norm (1/sqrt(dims)), so
    # its 162 dense columns do not outweigh the dozen words active in a transcript under one L2 penalty.
    block = 1.0 / np.sqrt(pro_train.shape[1])
    vectorizer = CountVectorizer(binary=True).fit([_field(r, "text") or "" for r in train_rows])
    bow_train = vectorizer.transform([_field(r, "text") or "" for r in train_rows])
    bow_test = vectorizer.transform([_field(r, "text") or "" for r in test_rows])
    features = {
        "prosody": (pro_train, pro_test),
        "words": (bow_train, bow_test),
        "both": (sparse.hstack([pro_train * block, bow_train]).tocsr(), sparse.hstack([pro_test * block, bow_test]).tocsr()),
    }
    scores = {}
    for name in REFERENCES:
        x_train, x_test = features[name]
        model = LogisticRegression(C=1.0, max_iter=5000).fit(x_train, y_train)
        scores[name] = float(f1_score(y_test, model.predict(x_test), average="weighted", zero_division=0))
    return scores


def score_references(corpus, train_split: str = "train", test_split: str = "test") -> dict:
    """:func:`fit_score_references` on a MELD-layout corpus folder (the demo corpus): fitted on
    ``train_split``, scored on ``test_split``. Returns ``{"weighted_f1": {"prosody": ..., "words": ...,
    "both": ...}, "train_split", "test_split", "n_train", "n_test"}``."""
    from ..data.meld import read_meld

    train, test = read_meld(corpus, train_split), read_meld(corpus, test_split)
    return {"weighted_f1": fit_score_references(train, test), "train_split": train_split, "test_split": test_split,
            "n_train": len(train), "n_test": len(test)}
