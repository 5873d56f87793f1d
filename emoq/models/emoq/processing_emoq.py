"""EmoQProcessor: audio features + chat prompt with the expanded `<|emoq|>` placeholder + label masking.

Why the processor expands the placeholder (Qwen2-Audio habit): the model then only has to check that
the number of placeholder tokens equals the number of query states and scatter them in place, and
the prompt is rendered by the LLM's own chat template exactly as at inference time.

Training targets are built as prompt tokens + answer tokens, where the answer tokens are what the chat
template appends for the assistant turn (label word + end-of-turn marker). Labels are -100 on every
prompt token. The same answer tokens are the candidates of `label_candidates()`, so
label scoring measures exactly what training optimised.

Features are extracted per clip and padded afterwards with a mask, so a clip's features do not depend
on what else is in the batch (bs=1 == bs=N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import AddedToken
from transformers import BatchFeature, ProcessorMixin

from ...audio import SAMPLE_RATE
from ..speech_encoder import encoder_output_length, frame_spec_of, frames_per_second
from .configuration_emoq import PLACEHOLDER_TOKEN

DEFAULT_SYSTEM_PROMPT = "You are an expert in recognising emotions from speech."
DEFAULT_QUESTION = "What emotion does the speaker express?"


def extract_features(feature_extractor, audio: np.ndarray, whisper: bool) -> np.ndarray:
    """[C, T] log-mel (Whisper) or [T] waveform (wav2vec2 family) of one clip, never padded or truncated."""
    out = feature_extractor(
        np.asarray(audio, dtype=np.float32),
        sampling_rate=getattr(feature_extractor, "sampling_rate", SAMPLE_RATE),
        return_tensors="np",
        **({"padding": "longest", "truncation": False} if whisper else {}),
    )
    key = "input_features" if "input_features" in out else "input_values"
    return out[key][0]


def pad_features(feats: list[np.ndarray]) -> dict:
    """Per-clip features right-padded into one batch, with the mask of real steps."""
    longest = max(f.shape[-1] for f in feats)
    out = np.zeros((len(feats), *feats[0].shape[:-1], longest), dtype=np.float32)
    mask = np.zeros((len(feats), longest), dtype=np.int64)
    for i, f in enumerate(feats):
        out[i, ..., : f.shape[-1]] = f
        mask[i, : f.shape[-1]] = 1
    return {"input_features": torch.from_numpy(out), "feature_attention_mask": torch.from_numpy(mask)}


def pad_ids(seqs, pad: int, side: str, ids_key: str, mask_key: str | None) -> dict:
    """Token id lists padded on `side` into [B, T] (at least one column), with their attention mask."""
    longest = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return {ids_key: ids, **({mask_key: mask} if mask_key else {})}


class EmoQProcessor(ProcessorMixin):
    """Turns (audio, transcript, question[, answer]) into model inputs.

    A transformers `ProcessorMixin`: `save_pretrained` writes the feature extractor, the tokenizer (with the
    `<|emoq|>` token) and `processor_config.json` (the settings below); `from_pretrained` — or
    `AutoProcessor.from_pretrained` once `emoq` is imported — reads them back.

    labels: the label words in id order (id2label); used for the answer options in the prompt and
        for `label_candidates()`.
    frame_spec: how encoder frames follow from audio length, {"kind": "whisper"} or
        {"kind": "conv", "kernels": [...], "strides": [...]} (needed for window-level queries).
    """

    def __init__(
        self,
        feature_extractor,
        tokenizer,
        labels: list[str],
        num_query_tokens: int = 32,
        window_seconds: float | None = None,
        frame_spec: dict | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        transcript_in_prompt: bool = True,
        max_transcript_tokens: int = 128,
        rationale_separator: str | None = None,
    ):
        if PLACEHOLDER_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(PLACEHOLDER_TOKEN, special=True, normalized=False)])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(feature_extractor, tokenizer)
        self.labels = list(labels)
        self.num_query_tokens = num_query_tokens
        self.window_seconds = window_seconds
        self.frame_spec = frame_spec or {"kind": "whisper"}
        self.system_prompt = system_prompt
        self.transcript_in_prompt = transcript_in_prompt
        self.rationale_separator = rationale_separator
        self.max_transcript_tokens = max_transcript_tokens
        self.sampling_rate = getattr(feature_extractor, "sampling_rate", SAMPLE_RATE)

    @property
    def frames_per_second(self) -> float:
        """Encoder frames per second of audio (what a `window_seconds` window holds)."""
        return frames_per_second(self.frame_spec)

    @property
    def audio_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKEN)

    # ------------------------------------------------------------------ audio

    def _is_whisper(self) -> bool:
        return self.frame_spec.get("kind") == "whisper"

    def extract_features(self, audio: np.ndarray) -> np.ndarray:
        return extract_features(self.feature_extractor, audio, whisper=self._is_whisper())

    def encoder_frames(self, feature_length: int) -> int:
        """Encoder output frames for a clip whose features have `feature_length` steps."""
        return encoder_output_length(self.frame_spec, feature_length)

    def num_queries(self, feature_length: int) -> int:
        if self.window_seconds is None:
            return self.num_query_tokens
        per_window = max(1, round(self.window_seconds * self.frames_per_second))
        return self.num_query_tokens * max(1, math.ceil(self.encoder_frames(feature_length) / per_window))

    # ------------------------------------------------------------------ text

    def messages(self, question: str | None = None, transcript: str | None = None,
                 history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """The chat about one clip: the first user turn carries the clip (placeholder) and the transcript;
        `history` holds the earlier (question, answer) turns, `question` is the one to answer now."""
        turns = [*history, (question, None)]
        lines = [PLACEHOLDER_TOKEN]
        if transcript and self.transcript_in_prompt:
            lines.append(f"Transcript: {transcript}")
        lines.append(turns[0][0] or self.default_question())
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": "\n".join(lines)})
        for i, (q, answer) in enumerate(turns):
            if i > 0:
                msgs.append({"role": "user", "content": q or self.default_question()})
            if answer is not None:
                msgs.append({"role": "assistant", "content": answer})
        return msgs

    def default_question(self) -> str:
        return f"{DEFAULT_QUESTION} Answer with one word from: {', '.join(self.labels)}."

    def render_prompt(self, messages: list[dict], num_queries: int) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(PLACEHOLDER_TOKEN) != 1:
            raise ValueError(f"the prompt must hold exactly one {PLACEHOLDER_TOKEN}, found {text.count(PLACEHOLDER_TOKEN)}")
        return text.replace(PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN * num_queries)

    def answer_suffix(self, messages: list[dict], answer: str) -> str:
        """What the chat template appends for an assistant turn saying `answer` (answer + end-of-turn)."""
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently once an answer follows it")
        return full[len(prompt):]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def label_candidates(self) -> list[list[int]]:
        """Token ids of each label's answer, in label order: label word + end of turn; or, for a model
        trained with rationales (`rationale_separator`, answers "label<sep>rationale"), label word +
        separator — the part of every trained answer that names the label."""
        msgs = self.messages()
        if self.rationale_separator is None:
            return [self._ids(self.answer_suffix(msgs, label)) for label in self.labels]
        candidates = []
        for label in self.labels:
            head = label + self.rationale_separator
            full = self.answer_suffix(msgs, head + "because of how it sounds.")
            ids = self._ids(full[: full.index(head) + len(head)])
            if self._ids(full)[: len(ids)] != ids:
                raise ValueError(f"the tokenizer merges {self.rationale_separator!r} with the rationale after "
                                 f"'{label}': choose another rationale separator")
            candidates.append(ids)
        return candidates

    def answer_text(self, label: str, rationale: str | None = None) -> str:
        """The assistant answer trained on: the label word, then the rationale when the processor has a
        `rationale_separator` and the utterance has one."""
        if rationale and self.rationale_separator is not None:
            return f"{label}{self.rationale_separator}{rationale.strip()}"
        return label

    # ------------------------------------------------------------------ batching

    def __call__(
        self,
        audios: list[np.ndarray],
        transcripts: list[str | None] | None = None,
        questions: list[str | None] | str | None = None,
        answers: list[str] | None = None,
        padding_side: str = "right",
        with_prompt: bool = True,
        histories: list[Sequence[tuple[str, str]]] | None = None,
    ) -> BatchFeature:
        """Batch of model inputs. `answers` adds `labels`; left padding is for `generate`;
        `histories` gives each clip's earlier (question, answer) turns for multi-turn chat."""
        n = len(audios)
        histories = list(histories) if histories is not None else [()] * n
        transcripts = list(transcripts) if transcripts is not None else [None] * n
        if questions is None or isinstance(questions, str):
            questions = [questions] * n
        feats = [self.extract_features(a) for a in audios]
        batch = pad_features(feats)
        batch.update(self.transcript_batch(transcripts))
        if with_prompt:
            seqs, labels = [], []
            for f, t, q, i in zip(feats, transcripts, questions, range(n)):
                msgs = self.messages(q, t, histories[i])
                prompt = self._ids(self.render_prompt(msgs, self.num_queries(f.shape[-1])))
                answer = self._ids(self.answer_suffix(msgs, answers[i])) if answers is not None else []
                seqs.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
            batch.update(self._pad_ids(seqs, padding_side, "input_ids", "attention_mask"))
            if answers is not None:
                batch.update(self._pad_ids(labels, padding_side, "labels", None, pad_value=-100))
        return BatchFeature(batch)

    def transcript_batch(self, transcripts: list[str | None]) -> dict:
        """Right-padded transcript ids for the EmoQ-Former ({} when no clip has a transcript)."""
        if not any(transcripts):
            return {}
        ids = [self._ids(t or "")[: self.max_transcript_tokens] for t in transcripts]
        return self._pad_ids(ids, "right", "transcript_ids", "transcript_attention_mask")

    def _pad_ids(self, seqs, side, ids_key, mask_key, pad_value=None) -> dict:
        return pad_ids(seqs, self.tokenizer.pad_token_id if pad_value is None else pad_value, side, ids_key, mask_key)

    def decode(self, token_ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True, **kwargs)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_encoder(cls, feature_extractor, tokenizer, labels, audio_config, **kwargs) -> EmoQProcessor:
        """Processor whose frame arithmetic matches the encoder described by `audio_config`."""
        return cls(feature_extractor, tokenizer, labels, frame_spec=frame_spec_of(audio_config), **kwargs)
