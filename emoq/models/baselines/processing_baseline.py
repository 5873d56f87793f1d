"""BaselineProcessor: model inputs for the classification baselines (Qieemo, Patamia et al. 2023).

Same audio path as `EmoQProcessor` (per-clip features, padded afterwards with a mask, so bs=1 == bs=N;
Whisper without its 30 s padding) and, when the model has a text branch, the transcript tokenized
with the *text encoder's own* tokenizer into ``text_input_ids`` / ``text_attention_mask``. There is
no chat prompt: these systems classify, they do not talk.

It answers the calls the shared `EmoQCollator` makes (``processor(audios, transcripts=..., ...)`` and
``transcript_batch``), so one dataset / collator / training loop drives every system.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from transformers import AutoFeatureExtractor, AutoTokenizer, BatchFeature

from ..emoq.processing_emoq import extract_features, pad_features, pad_ids
from ..speech_encoder import frame_spec_of

PROCESSOR_FILE = "baseline_processor.json"


class BaselineProcessor:
    """Audio features (+ text-encoder token ids) for a baseline; `tokenizer=None` for audio-only systems."""

    def __init__(self, feature_extractor, labels: list[str], tokenizer=None, frame_spec: dict | None = None,
                 max_text_tokens: int = 128):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.frame_spec = frame_spec or {"kind": "whisper"}
        self.max_text_tokens = max_text_tokens

    @classmethod
    def for_encoder(cls, feature_extractor, labels, audio_config, tokenizer=None, **kwargs) -> BaselineProcessor:
        return cls(feature_extractor, labels, tokenizer, frame_spec=frame_spec_of(audio_config), **kwargs)

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
        if self.tokenizer is None:
            return {}
        ids = [
            self.tokenizer(t, truncation=True, max_length=self.max_text_tokens)["input_ids"] if t else []
            for t in transcripts
        ]
        return pad_ids(ids, self.tokenizer.pad_token_id or 0, "right", "text_input_ids", "text_attention_mask")

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(path)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)
        settings = {"labels": self.labels, "frame_spec": self.frame_spec, "max_text_tokens": self.max_text_tokens,
                    "has_tokenizer": self.tokenizer is not None}
        (path / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> BaselineProcessor:
        path = Path(path)
        if not (path / PROCESSOR_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {PROCESSOR_FILE}; not a folder saved by BaselineProcessor")
        settings = json.loads((path / PROCESSOR_FILE).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(path) if settings.pop("has_tokenizer") else None
        return cls(AutoFeatureExtractor.from_pretrained(path), tokenizer=tokenizer, **settings)
