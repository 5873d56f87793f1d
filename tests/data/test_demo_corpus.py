"""The offline demo corpus: deterministic bytes, MELD layout that read_meld reads, learnable prosody."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from support.environment import require_module

require_module("espeakng_loader", "pip install espeakng-loader")

from emoq.data.demo_corpus import PROFILES, SENTENCES, build_demo_corpus  # noqa: E402
from emoq.data.meld import MELD_COLUMNS, read_meld  # noqa: E402

SMALL = {"train": 3, "dev": 1, "test": 2}
EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    a = build_demo_corpus(tmp_path_factory.mktemp("demo_a"), seed=3, per_class=SMALL, workers=2)
    b = build_demo_corpus(tmp_path_factory.mktemp("demo_b"), seed=3, per_class=SMALL, workers=1)
    return a, b


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(corpora):
    a, b = corpora
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert len([k for k in fa if k.endswith(".wav")]) == 7 * sum(SMALL.values())
    for name in fa:
        assert fa[name] == fb[name], name


def test_read_meld_reads_it_with_expected_counts(corpora):
    root = corpora[0]
    for split, n in SMALL.items():
        utts = read_meld(root, split)
        assert len(utts) == 7 * n
        assert Counter(u.label for u in utts) == {e: n for e in EMOTIONS}
        assert not any(u.extra.get("audio_missing") for u in utts)
        assert all(u.text in SENTENCES for u in utts)  # one neutral pool for every emotion
        assert len({u.speaker for u in utts}) >= 2
        for u in utts[:3]:
            data, sr = sf.read(u.audio, dtype="float32")
            assert sr == 16000 and data.ndim == 1 and 0.5 < len(data) / sr < 6.0
            assert np.isfinite(data).all() and np.abs(data).max() > 0.05


def test_csv_is_meld_shaped(corpora):
    raw = (corpora[0] / "train_sent_emo.csv").read_bytes()
    assert raw.count(b"\r\n") == 7 * SMALL["train"] + 1 and b"\n" not in raw.replace(b"\r\n", b"")
    rows = list(csv.reader(raw.decode("utf-8").splitlines()))
    assert tuple(rows[0]) == MELD_COLUMNS
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows)))
    assert all(r[9].count(":") == 2 and "," in r[9] for r in rows[1:])  # "00:12:34,567" StartTime


def test_prosody_separates_the_extremes(corpora):
    """Sadness is slower and quieter than anger (what the profiles promise, jitter included)."""
    utts = read_meld(corpora[0], "train")

    def stats(label):
        rms, rate = [], []
        for u in utts:
            if u.label == label:
                data, sr = sf.read(u.audio, dtype="float32")
                voiced = data[np.abs(data) > 0.02]
                rms.append(np.sqrt(np.mean(voiced**2)))
                rate.append(len(u.text.split()) / (len(data) / sr))
        return np.mean(rms), np.mean(rate)

    sad_rms, sad_rate = stats("sadness")
    ang_rms, ang_rate = stats("anger")
    assert ang_rms > sad_rms and ang_rate > sad_rate
    assert PROFILES["sadness"]["rate"] < PROFILES["anger"]["rate"]


def test_reuse_and_seed_changes_output(corpora, tmp_path):
    a = corpora[0]
    stamp = (a / "train_sent_emo.csv").stat().st_mtime_ns
    assert build_demo_corpus(a, seed=3, per_class=SMALL) == a  # same settings: reused, not rebuilt
    assert (a / "train_sent_emo.csv").stat().st_mtime_ns == stamp
    other = build_demo_corpus(tmp_path / "c", seed=4, per_class={"dev": 1})
    assert not (other / "train_sent_emo.csv").exists()
    assert (other / "dev_sent_emo.csv").read_bytes() != (a / "dev_sent_emo.csv").read_bytes()
    with pytest.raises(ValueError, match="unknown split"):
        build_demo_corpus(tmp_path / "d", per_class={"validation": 1})


def test_voice_quality_breathy_adds_envelope_noise_and_tense_adds_harmonics():
    from emoq.data.demo_corpus import VOICE_QUALITY, apply_voice_quality

    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    tone[: sr // 4] = 0.0  # a silent quarter second
    rng = np.random.default_rng(0)
    assert np.array_equal(apply_voice_quality(tone, "modal", rng, sr), tone)

    def band(x, lo, hi):
        spec = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1 / sr)
        return spec[(f >= lo) & (f < hi)].sum() / spec.sum()

    breathy = apply_voice_quality(tone, "breathy", np.random.default_rng(0), sr)
    assert band(breathy, 2000, 8000) > 100 * band(tone, 2000, 8000) + 0.01  # aspiration noise, high band
    assert np.abs(breathy[: sr // 4 - 200]).max() < 1e-3  # ... only where there is speech
    tense = apply_voice_quality(tone, "tense", rng, sr)
    assert np.abs(tense).max() == pytest.approx(0.5, rel=1e-4)  # same peak
    assert band(tense, 550, 650) > 0.01 > band(tone, 550, 650)  # the 3rd harmonic (600 Hz) appears
    with pytest.raises(ValueError, match="unknown voice quality"):
        apply_voice_quality(tone, "creaky", rng, sr)
    assert set(VOICE_QUALITY.values()) <= {"breathy", "tense"} and set(VOICE_QUALITY) <= set(EMOTIONS)
