"""BaselineProcessor: model inputs for the classification baselines (Qieemo, Patamia et al. 2023).

Same audio path as `EmoQProcessor` (per-clip features, padded afterwards with a mask, so bs=1 == bs=N;
Whisper without its 30 s padding) and, when the model has a text branch, the transcript tokenized
with the *text encoder's own* tokenizer into ``text_input_ids`` / ``text_attention_mask``. There is
no chat prompt: these systems classify, they do not talk.

It answers the calls the shared `EmoQCollator` makes (``processor(audios, transcripts=..., ...)`` and
``transcript_batch``), so one dataset / collator / training loop drives every system.

Two transformers `ProcessorMixin` classes, because a processor's parts are fixed by its signature:
`BaselineAudioProcessor` (feature extractor; Qieemo, or Patamia without text) and `BaselineProcessor`
(feature extractor + the text encoder's tokenizer). `for_encoder` picks the one that fits, and
`AutoProcessor.from_pretrained` reads back whichever was saved (once `emoq` is imported).
"""

from __future__ import annotations

import numpy as np
from transformers import BatchFeature, ProcessorMixin

from ..emoq.processing_emoq import extract_features, pad_features, pad_ids
from ..speech_encoder import frame_spec_of


class BaselineAudioProcessor(ProcessorMixin):
    """Audio features for a baseline without a text branch."""

    def __init__(self, feature_extractor, labels: list[str], frame_spec: dict | None = None,
                 max_text_tokens: int = 128):
        super().__init__(feature_extractor)
        self._configure(labels, frame_spec, max_text_tokens)

    def _configure(self, labels: list[str], frame_spec: dict | None, max_text_tokens: int) -> None:
        self.labels = list(labels)
        self.frame_spec = frame_spec or {"kind": "whisper"}
        self.max_text_tokens = max_text_tokens

    @classmethod
    def for_encoder(cls, feature_extractor, labels, audio_config, tokenizer=None, **kwargs):
        """The processor for a baseline on the encoder of `audio_config`: with the text encoder's tokenizer
        (`BaselineProcessor`) when there is one, else audio only."""
        spec = frame_spec_of(audio_config)
        if tokenizer is None:
            return BaselineAudioProcessor(feature_extractor, labels, frame_spec=spec, **kwargs)
        return BaselineProcessor(feature_extractor, tokenizer, labels, frame_spec=spec, **kwargs)

    def __call__(
        self,
        audios: list[np.ndarray],
        transcripts: list[str | None] | None = None,
        questions=None,
        answers: list[str] | None = None,
        padding_side: str = "right",
        with_prompt: bool = False,
    ) -> BatchFeature:
        """Padded features (+ text ids). `questions` / `padding_side` are the chat options of EmoQ's
        processor, meaningless here and ignored; asking for a prompt or answer tokens is an error."""
        if with_prompt or answers is not None:
            raise ValueError("a baseline classifier takes no chat prompt and no answer tokens (use EmoQ for chat)")
        whisper = self.frame_spec.get("kind") == "whisper"
        batch = pad_features([extract_features(self.feature_extractor, a, whisper) for a in audios])
        batch.update(self.transcript_batch(list(transcripts) if transcripts is not None else [None] * len(audios)))
        return BatchFeature(batch)

    def transcript_batch(self, transcripts: list[str | None]) -> dict:
        """`text_input_ids` / `text_attention_mask` from the text encoder's tokenizer ({} without a
        tokenizer). A row without a transcript has an all-zero mask (the model's learned "missing text"
        vector stands in for it) — also when no row has one, so the text branch takes part in every
        batch (DDP expects every trainable parameter in every step's graph)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            return {}
        ids = [tokenizer(t, truncation=True, max_length=self.max_text_tokens)["input_ids"] if t else []
               for t in transcripts]
        return pad_ids(ids, tokenizer.pad_token_id or 0, "right", "text_input_ids", "text_attention_mask")


class BaselineProcessor(BaselineAudioProcessor):
    """Audio features + transcript ids from the text encoder's own tokenizer (Patamia et al. with text)."""

    def __init__(self, feature_extractor, tokenizer, labels: list[str], frame_spec: dict | None = None,
                 max_text_tokens: int = 128):
        ProcessorMixin.__init__(self, feature_extractor, tokenizer)
        self._configure(labels, frame_spec, max_text_tokens)
