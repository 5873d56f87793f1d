"""emoq.asr: the Transcriber's batching and decoding settings (a fake Whisper), and the real builtin Whisper
tiny.en transcribing espeak speech, directly and inside an EmotionRecognizer."""

import re

import numpy as np
import pytest
import torch
from support.environment import require_module

from emoq.asr import DEFAULT_ASR, Transcriber, asr_ref
from emoq.config import ModelConfig


@pytest.mark.parametrize("value, expected", [
    (None, None), ("", None), ("none", None), ("None", None), ("null", None), ("  NONE ", None),
    ("builtin:whisper-tiny.en", "builtin:whisper-tiny.en"), ("openai/whisper-small", "openai/whisper-small"),
])
def test_asr_ref(value, expected):
    assert asr_ref(value) == expected


def test_the_run_config_default_is_the_builtin_whisper():
    assert ModelConfig().asr == DEFAULT_ASR == "builtin:whisper-tiny.en"


class FakeWhisper(torch.nn.Module):
    """Records each generate call; "transcribes" a clip as the number of its non-silent mel frames."""

    dtype = torch.float32

    def __init__(self, multilingual: bool):
        super().__init__()
        self.generation_config = type("G", (), {"is_multilingual": multilingual})()
        self.calls = []

    def generate(self, input_features, attention_mask=None, **kwargs):
        self.calls.append((input_features.shape[0], kwargs))
        return (input_features.abs().sum(1) > 1e-3).sum(-1, keepdim=True)  # [B, 1]


class FakeProcessor:
    def feature_extractor(self, clips, sampling_rate, return_tensors, return_attention_mask):
        assert sampling_rate == 16000 and return_tensors == "pt" and return_attention_mask
        width = max(len(c) for c in clips) // 160
        feats = torch.zeros(len(clips), 2, width)
        for i, c in enumerate(clips):
            feats[i, :, : len(c) // 160] = 1.0
        return type("F", (), {"input_features": feats, "attention_mask": torch.ones(len(clips), width)})()

    def batch_decode(self, ids, skip_special_tokens):
        return [f"  {int(row[0])} frames " for row in ids]


@pytest.mark.parametrize("multilingual", [False, True])
def test_transcribe_batches_keeps_order_and_decodes_greedily_in_english(multilingual):
    model = FakeWhisper(multilingual)
    asr = Transcriber(model, FakeProcessor(), device="cpu", batch_size=2, max_new_tokens=50)
    clips = [np.ones(n * 160, np.float32) for n in (7, 3, 5, 9, 4)]
    assert asr.transcribe(clips) == ["7 frames", "3 frames", "5 frames", "9 frames", "4 frames"]
    assert [n for n, _ in model.calls] == [2, 2, 1]
    language = {"language": "en", "task": "transcribe"} if multilingual else {}  # tiny.en refuses a language
    for _, kwargs in model.calls:
        assert kwargs == {"do_sample": False, "num_beams": 1, "max_new_tokens": 50, **language}
    assert asr.transcribe([]) == []
    with pytest.raises(ValueError, match="batch_size"):
        Transcriber(model, FakeProcessor(), device="cpu", batch_size=0)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


@pytest.mark.slow
def test_builtin_whisper_transcribes_espeak_speech_for_the_recognizer(whisper_dir, tiny):
    """The default `model.asr` end to end: resolved offline (the session's converted folder), loaded lazily by
    the recognizer on the first clip without a transcript, batched, and its words reach the results."""
    require_module("espeakng_loader", "pip install espeakng-loader")
    from emoq.data.tts import synthesize
    from emoq.inference import EmotionRecognizer

    sentences = ["I am so happy to see you today.", "Please call me tomorrow morning."]
    speech = [synthesize(text, voice="en-us", sample_rate=16000)[0] for text in sentences]
    model, processor = tiny()
    rec = EmotionRecognizer(model, processor, device="cpu", asr="builtin:whisper-tiny.en")
    results = rec.classify_batch([speech[0], speech[1], speech[0]], [None, None, "given words"])
    assert [r["transcript_source"] for r in results] == ["asr", "asr", "gold"]
    assert [_words(r["transcript"]) for r in results[:2]] == [_words(t) for t in sentences]
    assert results[2]["transcript"] == "given words"

    whisper = rec.transcriber  # the builtin model, loaded once by the call above
    assert isinstance(whisper, Transcriber) and whisper.name == "builtin:whisper-tiny.en"
    assert whisper.model.config.d_model == 384  # tiny.en, from the session's converted folder
    whisper.batch_size = 1  # one clip per batch: the same words as batched
    assert [_words(t) for t in whisper.transcribe(speech)] == [_words(t) for t in sentences]
