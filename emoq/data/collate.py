"""From utterance records to padded model batches.

`UtteranceDataset` yields one dict per utterance (audio decoded on access, or cached encoder frames);
`EmoQCollator` pads a list of them through `EmoQProcessor` (right padding and assistant-only labels for
training, left padding for generation) and adds the class ids used by the MAL heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..audio import SAMPLE_RATE, AudioError, load_audio
from .records import Utterance


@dataclass
class ScanResult:
    """Which utterances can be used, and why the others cannot (every input accounted for)."""

    ok: list[Utterance]
    durations: list[float]
    errors: list[tuple[str, str]]  # (key, message)
    unlabeled: list[str]


def scan_utterances(utts: Sequence[Utterance], max_seconds: float | None = None) -> ScanResult:
    """Decode every clip once: keep the usable ones, report the rest with the loader's message."""
    ok, durations, errors, unlabeled = [], [], [], []
    for u in utts:
        if u.label is None:
            unlabeled.append(u.key)
            continue
        if u.audio is None:
            errors.append((u.key, u.extra.get("error") or "no audio file"))
            continue
        try:
            audio = load_audio(u.audio, max_seconds=max_seconds)
        except AudioError as err:
            errors.append((u.key, str(err)))
            continue
        ok.append(u)
        durations.append(len(audio) / SAMPLE_RATE)
    return ScanResult(ok, durations, errors, unlabeled)


class UtteranceDataset(Dataset):
    """Items: {key, audio (float32 16 kHz) | frames (cached encoder output), label, label_id, text}."""

    def __init__(
        self,
        utts: Sequence[Utterance],
        label2id: dict[str, int],
        max_seconds: float | None = None,
        use_transcript: bool = True,
        frame_cache: dict[str, torch.Tensor] | None = None,
    ):
        self.utts = list(utts)
        self.label2id = label2id
        self.max_seconds = max_seconds
        self.use_transcript = use_transcript
        self.frame_cache = frame_cache

    def __len__(self) -> int:
        return len(self.utts)

    def __getitem__(self, i: int) -> dict:
        u = self.utts[i]
        if self.frame_cache is not None and u.key in self.frame_cache:
            return {**utterance_item(u, self.label2id, self.use_transcript), "frames": self.frame_cache[u.key]}
        audio = load_audio(u.audio, max_seconds=self.max_seconds)
        return {**utterance_item(u, self.label2id, self.use_transcript), "audio": audio}


def utterance_item(u: Utterance, label2id: dict[str, int], use_transcript: bool) -> dict:
    """What a batch needs of an utterance besides its audio (the collator's item, less `audio` / `frames`)."""
    return {
        "key": u.key,
        "label": u.label,
        "label_id": label2id[u.label] if u.label is not None else -100,
        "text": u.text if use_transcript else None,
        "rationale": u.extra.get("rationale"),  # a free manifest field; trained on when data.rationale
    }


class EmoQCollator:
    """Pads items into a batch. `with_answers` adds LM labels (stage 2); `with_prompt=False` is stage 1."""

    def __init__(self, processor, with_prompt: bool = True, with_answers: bool = False,
                 padding_side: str = "right", question: str | None = None):
        self.processor = processor
        self.with_prompt = with_prompt
        self.with_answers = with_answers
        self.padding_side = padding_side
        self.question = question

    def __call__(self, items: list[dict]) -> dict:
        texts = [it.get("text") for it in items]
        if "frames" in items[0]:
            batch = self._from_frames(items, texts)
        else:
            batch = dict(self.processor(
                [it["audio"] for it in items],
                transcripts=texts,
                questions=self.question,
                answers=[self.processor.answer_text(it["label"], it.get("rationale")) for it in items]
                if self.with_answers else None,
                padding_side=self.padding_side,
                with_prompt=self.with_prompt,
            ))
        batch["emotion_labels"] = torch.tensor([it["label_id"] for it in items], dtype=torch.long)
        batch["keys"] = [it["key"] for it in items]
        return batch

    def _from_frames(self, items: list[dict], texts: list[str | None]) -> dict:
        """Cached encoder frames: pad them; the transcript goes through the processor as usual (stage 1 only)."""
        if self.with_prompt:
            raise ValueError("cached encoder frames are for stage 1 (no LLM prompt)")
        frames = [it["frames"] for it in items]
        longest = max(f.shape[0] for f in frames)
        out = torch.zeros(len(frames), longest, frames[0].shape[-1], dtype=frames[0].dtype)
        mask = torch.zeros(len(frames), longest, dtype=torch.bool)
        for i, f in enumerate(frames):
            out[i, : f.shape[0]] = f
            mask[i, : f.shape[0]] = True
        return {"encoder_frames": out, "encoder_frame_mask": mask, **self.processor.transcript_batch(texts)}
