"""EmotionRecognizer: batch invariance of classification, streamed chat, and transcripts (given ones kept,
missing ones transcribed by the ASR model in one call, the source reported). (`emoq eval`: tests/evaluation)"""

import numpy as np
import pytest
import yaml
from support.asr import CountingTranscriber

from emoq.inference import BaselineRecognizer, EmotionRecognizer, Transcript


def test_classify_batch_of_16_equals_one_by_one(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(int(16000 * rng.uniform(0.5, 2.0))) * 0.1).astype(np.float32) for _ in range(16)]
    batched = rec.classify_batch(clips, batch_size=16)
    for clip, res in zip(clips, batched):
        one = rec.classify((clip, 16000))
        assert one["label"] == res["label"]
        np.testing.assert_allclose(list(one["log_likelihoods"].values()), list(res["log_likelihoods"].values()),
                                   rtol=1e-5, atol=1e-4)
    assert abs(sum(batched[0]["scores"].values()) - 1) < 1e-5


def test_chat_streams_the_same_text_as_non_streaming(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    clip = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    full = rec.chat((clip, 16000), "How does the speaker feel?", max_new_tokens=6)
    streamed = "".join(rec.chat((clip, 16000), "How does the speaker feel?", stream=True, max_new_tokens=6))
    assert streamed.strip() == full


# ---------------------------------------------------------------- transcripts: given, transcribed, none


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def _spy_texts(rec, monkeypatch) -> list:
    """The transcripts that reach the model, in the order `score_batch` sees them."""
    seen = []
    original = rec.score_batch

    def spy(audios, texts=None):
        seen.extend(texts if texts is not None else [None] * len(audios))
        return original(audios, texts)

    monkeypatch.setattr(rec, "score_batch", spy)
    return seen


CLIPS = [_noise(s, i) for i, s in enumerate((0.5, 0.6, 0.7, 0.8, 0.9))]  # 8000, 9600, ..., 14400 samples
TEXTS = ["you did it", None, "", "well then", "   "]  # None, empty and blank: missing
USED = [("you did it", "gold"), ("heard 9600 samples", "asr"), ("heard 11200 samples", "asr"),
        ("well then", "gold"), ("heard 14400 samples", "asr")]


def test_only_clips_without_a_transcript_are_transcribed_in_one_call(tiny, monkeypatch):
    model, processor = tiny()
    asr = CountingTranscriber()
    rec = EmotionRecognizer(model, processor, device="cpu", transcriber=asr)
    assert rec.use_transcript and rec.can_transcribe and rec.asr == "stub-asr"
    seen = _spy_texts(rec, monkeypatch)
    results = rec.classify_batch(CLIPS, TEXTS, batch_size=2)
    assert asr.calls == [[9600, 11200, 14400]]  # one call, exactly the clips without text
    assert [(r["transcript"], r["transcript_source"]) for r in results] == USED
    assert seen == [t for t, _ in USED]  # what the model read (length order = input order here)
    # a transcribed text is used exactly as if it had been given
    given = rec.classify_batch(CLIPS, [t for t, _ in USED], batch_size=2)
    assert [r["log_likelihoods"] for r in given] == [r["log_likelihoods"] for r in results]
    assert {r["transcript_source"] for r in given} == {"gold"} and len(asr.calls) == 1
    # a resolved Transcript keeps its source and is not transcribed again
    again = rec.classify_batch(CLIPS[:2], rec.transcripts(CLIPS[:2], [None, "hi"]))
    assert [(r["transcript"], r["transcript_source"]) for r in again] == [("heard 8000 samples", "asr"),
                                                                          ("hi", "gold")]
    assert asr.calls[1:] == [[8000]]


def test_no_transcription_without_an_asr_model_or_when_asked_not_to(tiny, monkeypatch):
    model, processor = tiny()
    asr = CountingTranscriber()
    rec = EmotionRecognizer(model, processor, device="cpu", transcriber=asr)
    seen = _spy_texts(rec, monkeypatch)
    results = rec.classify_batch(CLIPS, TEXTS, transcribe=False)
    assert asr.calls == [] and seen == ["you did it", None, None, "well then", None]
    assert [r["transcript_source"] for r in results] == ["gold", "none", "none", "gold", "none"]
    assert [r["transcript"] for r in results] == ["you did it", None, None, "well then", None]

    plain = EmotionRecognizer(model, processor, device="cpu")  # built directly: no ASR model
    assert plain.asr is None and not plain.can_transcribe and plain.transcriber is None
    assert [r["transcript_source"] for r in plain.classify_batch(CLIPS, TEXTS)] == ["gold", "none", "none",
                                                                                   "gold", "none"]


def test_a_model_without_transcripts_reads_none_and_never_transcribes(tiny, monkeypatch):
    model, processor = tiny(use_transcript=False)
    asr = CountingTranscriber()
    rec = EmotionRecognizer(model, processor, device="cpu", transcriber=asr)
    assert not rec.use_transcript and not rec.can_transcribe
    seen = _spy_texts(rec, monkeypatch)
    results = rec.classify_batch(CLIPS, TEXTS)
    assert asr.calls == [] and seen == [None] * 5  # given text is dropped too
    assert {(r["transcript"], r["transcript_source"]) for r in results} == {(None, "none")}


def test_chat_transcribes_a_clip_without_text_once(tiny, monkeypatch):
    model, processor = tiny()
    asr = CountingTranscriber()
    rec = EmotionRecognizer(model, processor, device="cpu", transcriber=asr)
    prompts = []
    original = processor.__call__

    def spy(audios, transcripts=None, **kwargs):
        prompts.append(list(transcripts) if transcripts is not None else None)
        return original(audios, transcripts=transcripts, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", lambda self, *a, **k: spy(*a, **k))
    clip = CLIPS[1]
    whole = rec.chat((clip, 16000), "how?", max_new_tokens=3)
    streamed = "".join(rec.chat((clip, 16000), "how?", stream=True, max_new_tokens=3))
    assert streamed.strip() == whole
    assert asr.calls == [[9600], [9600]] and prompts == [["heard 9600 samples"]] * 2
    rec.chat((clip, 16000), "how?", text="given words", max_new_tokens=3)
    "".join(rec.chat((clip, 16000), "how?", text=Transcript("earlier", "asr"), stream=True, max_new_tokens=3))
    assert len(asr.calls) == 2 and prompts[2:] == [["given words"], ["earlier"]]
    assert rec.chat_batch([clip, CLIPS[0]], ["how?", "why?"], ["given", None], max_new_tokens=2)
    assert asr.calls[2:] == [[8000]] and prompts[-1] == ["given", "heard 8000 samples"]


def test_the_asr_model_is_loaded_lazily_from_the_run_config(saved_model, tmp_path, monkeypatch):
    import shutil

    from emoq.asr import Transcriber

    loads = []

    def load(ref, device=None, **kwargs):
        loads.append(ref)
        return CountingTranscriber()

    monkeypatch.setattr(Transcriber, "from_pretrained", staticmethod(load))
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    assert EmotionRecognizer.from_pretrained(folder, device="cpu").asr is None  # no run config: no ASR

    run_config = folder / "weights" / "run_config.yaml"
    run_config.write_text(yaml.safe_dump({"seed": 1, "model": {"system": "emoq"}}))  # predates model.asr
    assert EmotionRecognizer.from_pretrained(folder, device="cpu").asr == "builtin:whisper-tiny.en"
    run_config.write_text(yaml.safe_dump({"model": {"asr": None}}))
    assert EmotionRecognizer.from_pretrained(folder, device="cpu").asr is None
    run_config.write_text(yaml.safe_dump({"model": {"asr": "my/whisper"}}))
    assert EmotionRecognizer.from_pretrained(folder, device="cpu", asr="none").asr is None  # overrides
    assert EmotionRecognizer.from_pretrained(folder, device="cpu", asr="other/whisper").asr == "other/whisper"

    rec = EmotionRecognizer.from_pretrained(folder, device="cpu")
    assert rec.asr == "my/whisper" and rec.can_transcribe
    rec.classify_batch(CLIPS[:2], ["a", "b"])
    assert loads == []  # every clip had its transcript: nothing loaded
    rec.classify_batch(CLIPS[:2], [None, "b"])
    rec.classify((CLIPS[2], 16000))
    assert loads == ["my/whisper"]  # loaded once, on first need
    assert rec.transcriber.calls == [[8000], [11200]]


@pytest.mark.parametrize("with_text", [True, False])
def test_a_baseline_with_a_text_branch_transcribes_the_same_way(with_text):
    from emoq.models.tiny import build_tiny_baseline

    model, processor = build_tiny_baseline("patamia", ["neutral", "joy", "anger"], with_text=with_text)
    asr = CountingTranscriber()
    rec = BaselineRecognizer(model, processor, device="cpu", transcriber=asr)
    results = rec.classify_batch(CLIPS, TEXTS, batch_size=2)
    if with_text:
        assert asr.calls == [[9600, 11200, 14400]]
        assert [(r["transcript"], r["transcript_source"]) for r in results] == USED
    else:
        assert asr.calls == [] and {r["transcript_source"] for r in results} == {"none"}


@pytest.mark.parametrize("batch_size", [0, -1])
def test_classify_batch_refuses_a_batch_size_below_one(saved_model, batch_size):
    """A negative batch size used to return one empty result per clip, without a word."""
    recognizer = EmotionRecognizer.from_pretrained(saved_model)
    clip = np.zeros(16000, dtype=np.float32)
    with pytest.raises(ValueError, match=f"batch_size must be at least 1, got {batch_size}"):
        recognizer.classify_batch([clip, clip], batch_size=batch_size)
