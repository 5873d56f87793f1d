"""The offline demo corpus: deterministic bytes, MELD layout that read_meld reads, and the emotion split
between voice and words (each alone finds a group of emotions, only both find the emotion)."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from support.environment import require_module

require_module("espeakng_loader", "pip install espeakng-loader")

from emoq.data.demo_corpus import (  # noqa: E402
    ACOUSTIC_GROUPS,
    DEFAULT_PER_CLASS,
    EMOTION_TABLE,
    HELD_OUT,
    LEXICAL_GROUPS,
    PROFILES,
    SENTENCES,
    build_demo_corpus,
)
from emoq.data.meld import MELD_COLUMNS, read_meld  # noqa: E402

SMALL = {"train": 3, "dev": 1, "test": 2}
EMOTIONS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    a = build_demo_corpus(tmp_path_factory.mktemp("demo_a"), seed=3, per_class=SMALL, workers=2)
    b = build_demo_corpus(tmp_path_factory.mktemp("demo_b"), seed=3, per_class=SMALL, workers=1)
    return a, b


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    """The corpus `emoq demo` builds (default sizes and seed): a few seconds with 2 workers."""
    return build_demo_corpus(tmp_path_factory.mktemp("demo_default"), workers=2)


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
        assert len({u.speaker for u in utts}) >= 2
        for u in utts[:3]:
            data, sr = sf.read(u.audio, dtype="float32")
            assert sr == 16000 and data.ndim == 1 and 0.5 < len(data) / sr < 8.0
            assert np.isfinite(data).all() and np.abs(data).max() > 0.05


def test_words_come_from_the_lexical_groups_pool_and_dev_test_sentences_are_held_out(corpora):
    root = corpora[0]
    for split in SMALL:
        for u in read_meld(root, split):
            pool = SENTENCES[EMOTION_TABLE[u.label][1]]
            part = pool[:-HELD_OUT] if split == "train" else pool[-HELD_OUT:]
            assert u.text in part, (split, u.label, u.text)
            assert u.extra["sentiment"] == EMOTION_TABLE[u.label][1]  # Sentiment = lexical group only


def test_csv_is_meld_shaped(corpora):
    raw = (corpora[0] / "train_sent_emo.csv").read_bytes()
    assert raw.count(b"\r\n") == 7 * SMALL["train"] + 1 and b"\n" not in raw.replace(b"\r\n", b"")
    rows = list(csv.reader(raw.decode("utf-8").splitlines()))
    assert tuple(rows[0]) == MELD_COLUMNS
    assert [int(r[0]) for r in rows[1:]] == list(range(1, len(rows)))
    assert all(r[9].count(":") == 2 and "," in r[9] for r in rows[1:])  # "00:12:34,567" StartTime


def test_the_table_is_a_code_that_no_single_modality_breaks():
    assert set(EMOTION_TABLE) == set(EMOTIONS)
    assert len(set(EMOTION_TABLE.values())) == len(EMOTIONS)  # the pair identifies the emotion
    for axis, groups in ((0, ACOUSTIC_GROUPS), (1, LEXICAL_GROUPS)):
        sizes = Counter(pair[axis] for pair in EMOTION_TABLE.values())
        assert set(sizes) == set(groups) and min(sizes.values()) >= 2  # a group never names one emotion
    assert set(PROFILES) == set(ACOUSTIC_GROUPS) and set(SENTENCES) == set(LEXICAL_GROUPS)


def test_sentence_pools_carry_wording_but_no_emotion_names():
    label_words = re.compile(r"\b(angry|anger|happy|happiness|sad|sadness|surprised?|surprising|afraid|fear\w*|"
                             r"disgust\w*|neutral|joy\w*|scared|furious)\b", re.I)
    sizes = {len(pool) for pool in SENTENCES.values()}
    assert len(sizes) == 1 and sizes.pop() >= 36 and 0 < HELD_OUT < len(SENTENCES["neutral"]) // 2
    for pool in SENTENCES.values():
        assert len(set(pool)) == len(pool)
        assert not [s for s in pool if label_words.search(s)]
        assert len({len(s.split()) for s in pool}) >= 4  # varied lengths

    def words(s):
        return [w for w in re.findall(r"[a-z]+", s.lower()) if w not in ("a", "an")]

    # Positive and negative twins move one "un-" between the same stems: alike to the ear.
    for pos, neg in zip(SENTENCES["positive"], SENTENCES["negative"]):
        stems = sorted(re.sub(r"^(un|dis|im)", "", w) for w in words(pos) if w not in words(neg))
        assert stems == sorted(re.sub(r"^(un|dis|im)", "", w) for w in words(neg) if w not in words(pos)), pos
    # Every valence word of a held-out sentence is heard in training sentences too.
    for group in ("positive", "negative"):
        other = "negative" if group == "positive" else "positive"
        seen = {w for s in SENTENCES[group][:-HELD_OUT] for w in words(s)}
        for s, twin in zip(SENTENCES[group][-HELD_OUT:], SENTENCES[other][-HELD_OUT:]):
            assert {w for w in words(s) if w not in words(twin)} <= seen, s


def test_metadata_does_not_encode_the_class(default_corpus):
    """The CSV span is the text's nominal length, so the same sentence has the same span in every class."""
    spans: dict[str, set[float]] = {}
    with open(default_corpus / "train_sent_emo.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            def seconds(t):
                h, m, rest = t.split(":")
                s, ms = rest.split(",")
                return 3600 * int(h) + 60 * int(m) + int(s) + int(ms) / 1000

            spans.setdefault(row["Utterance"], set()).add(seconds(row["EndTime"]) - seconds(row["StartTime"]))
    assert all(max(v) - min(v) < 0.0025 for v in spans.values())  # millisecond rounding of both ends
    info = json.loads((default_corpus / "demo_corpus.json").read_text())
    assert info["version"] == 3 and info["table"]["high"]["negative"] == "anger"
    assert info["table"]["middle"]["negative"] is None and info["sentence_pools"]["positive"] == len(SENTENCES["positive"])


def test_prosody_separates_the_extremes(corpora):
    """Sadness (low arousal) is slower and quieter than anger (high), what the profiles promise, jitter included."""
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
    assert EMOTION_TABLE["sadness"][0] == "low" and EMOTION_TABLE["anger"][0] == "high"
    assert PROFILES["low"]["rate"] < PROFILES["middle"]["rate"] < PROFILES["high"]["rate"]


def test_fusion_is_needed_on_the_default_corpus(default_corpus):
    """Fitted on train, scored on test: voice alone and words alone find only groups, both find the emotion."""
    from emoq.evaluation.references import score_references

    result = score_references(default_corpus)
    assert (result["n_train"], result["n_test"]) == (7 * DEFAULT_PER_CLASS["train"], 7 * DEFAULT_PER_CLASS["test"])
    scores = result["weighted_f1"]
    assert scores["prosody"] <= 0.6, scores
    assert scores["words"] <= 0.6, scores
    assert scores["both"] >= 0.95, scores


def test_prosody_features_shape_and_level():
    from emoq.evaluation.references import N_MELS, log_mel

    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mel = log_mel(tone)
    assert mel.shape == (1 + (sr - 400) // 160, N_MELS)
    quiet = log_mel(0.1 * tone).mean(0)
    peak = int(np.argmax(mel.mean(0)))
    assert peak == int(np.argmax(quiet))  # the same band, whatever the level
    assert mel.mean(0)[peak] - quiet[peak] == pytest.approx(np.log(100), abs=1e-3)  # power: 20 dB = log(100)


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
    assert set(VOICE_QUALITY) == set(ACOUSTIC_GROUPS) and set(VOICE_QUALITY.values()) <= {"breathy", "tense", "modal"}


def test_demo_corpus_as_a_datasets_folder_reads_back_row_for_row(corpora, tmp_path):
    """`emoq demo --format hf`: the same clips, keys, labels and transcripts through the hf reader."""
    from emoq.audio import load_audio
    from emoq.data.hf import meld_to_hf, read_hf

    a, _ = corpora
    folder = meld_to_hf(a, tmp_path / "hf")
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        meld, hf = read_meld(a, split), read_hf(str(folder), name)
        assert [(u.key, u.label, u.text, u.speaker) for u in hf] == [(u.key, u.label, u.text, u.speaker) for u in meld]
    assert np.array_equal(load_audio(hf[0].audio), load_audio(meld[0].audio))
