"""Speech recognition for clips that arrive without a transcript: a Whisper model run through transformers.

A model trained with transcripts (`use_transcript`) reads the words being said next to the audio. When a
clip comes without its words (`emoq chat` without --text, `emoq predict` on bare files, a `/v1/audio/emotion`
request without "text", `emoq eval --transcripts asr`), `EmotionRecognizer` asks a `Transcriber` for them.
Which Whisper model is the run config's `model.asr` (default `builtin:whisper-tiny.en`, converted offline
from a PyPI package by `emoq.hub`; any Whisper hub id or local folder works too; null: never transcribe).

Decoding is greedy and English (a multilingual Whisper is told the language; an English-only one needs no
telling). Whisper reads 30 s windows: a longer clip is transcribed from its first 30 s only (the
recognizer already cuts clips at `max_seconds`, 30 s by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .audio import SAMPLE_RATE

#: the run config's default `model.asr`
DEFAULT_ASR = "builtin:whisper-tiny.en"
#: values of `model.asr` / `--asr` that switch transcription off
DISABLED = ("", "none", "null")


def asr_ref(value) -> str | None:
    """A `model.asr` value as a model reference, or None when it disables transcription."""
    if value is None:
        return None
    text = str(value).strip()
    return None if text.lower() in DISABLED else text


class Transcriber:
    """Clips (16 kHz mono float arrays) -> text, with a Whisper model; batched, greedy, English."""

    def __init__(self, model, processor, device=None, batch_size: int = 8, max_new_tokens: int = 224,
                 name: str | None = None):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.name = name
        multilingual = getattr(model.generation_config, "is_multilingual", False)
        # an English-only checkpoint refuses a language/task; a multilingual one is pinned to English
        self._language = {"language": "en", "task": "transcribe"} if multilingual else {}

    @classmethod
    def from_pretrained(cls, ref: str, device=None, **kwargs) -> Transcriber:
        """A Whisper model from a reference `emoq.hub.resolve_model` understands: `builtin:whisper-tiny.en`
        (converted offline, once), a hub id such as `openai/whisper-small`, or a local folder."""
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from .hub import resolve_model

        folder = resolve_model(ref)
        model = WhisperForConditionalGeneration.from_pretrained(folder)
        return cls(model, WhisperProcessor.from_pretrained(folder), device=device, name=str(ref), **kwargs)

    def transcribe(self, clips: Sequence[np.ndarray]) -> list[str]:
        """One transcript per clip, in input order ("" where Whisper hears no words)."""
        import torch

        texts: list[str] = []
        for start in range(0, len(clips), self.batch_size):
            part = [np.asarray(c, dtype=np.float32) for c in clips[start : start + self.batch_size]]
            features = self.processor.feature_extractor(part, sampling_rate=SAMPLE_RATE, return_tensors="pt",
                                                        return_attention_mask=True)
            with torch.no_grad():
                ids = self.model.generate(
                    features.input_features.to(self.device, self.model.dtype),
                    attention_mask=features.attention_mask.to(self.device),
                    do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens, **self._language,
                )
            texts += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return texts
