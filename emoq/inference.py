"""EmotionRecognizer: what users do with a trained model — classify clips, ask chat-style questions.

`classify` never generates free text: it scores each label's answer under the LLM (`score_labels`)
and returns the distribution, so results do not depend on decoding and cannot be a hallucinated
label. Batches are length-grouped (similar durations together) and returned in input order; a
clip's result is the same whatever else is in its batch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, load_audio, load_audio_bytes, resample

AudioInput = str | Path | bytes | np.ndarray | tuple
BASELINE_MODEL_TYPES = ("qieemo", "patamia")


def weights_folder(path: str | Path) -> Path:
    """Accept a training output (`.../final`) or the `weights/` folder inside it."""
    path = Path(path)
    if (path / "weights" / "config.json").is_file():
        return path / "weights"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path}: no EmoQ model here (expected config.json or weights/config.json)")


class EmotionRecognizer:
    #: whether `chat` / `chat_batch` can answer in free text (EmoQ: yes; the classifier baselines: no)
    can_chat = True

    def __init__(self, model, processor, device: str | torch.device | None = None, max_seconds: float | None = 30.0):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.labels = list(model.config.id2label.values())
        self.max_seconds = max_seconds
        self.use_transcript = bool(getattr(model.config, "use_transcript", False))

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: torch.dtype | None = None, **kwargs):
        """Any trained emoq model folder: EmoQ, or a baseline (Qieemo, Patamia), chosen by its config."""
        folder = weights_folder(path)
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
        load = {"dtype": dtype} if dtype else {}
        if model_type in BASELINE_MODEL_TYPES:
            from transformers import AutoModel, AutoProcessor

            from . import models  # noqa: F401  (registers the baselines with the Auto classes)

            model = AutoModel.from_pretrained(folder, **load)
            return BaselineRecognizer(model, AutoProcessor.from_pretrained(folder), device=device, **kwargs)
        from .models import EmoQForConditionalGeneration, EmoQProcessor
        from .models.emoq.modeling_emoq import is_quantized_folder

        if is_quantized_folder(folder):  # QLoRA: the 4-bit LLM is placed on the target device when loaded
            load["device_map"] = str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
        model = EmoQForConditionalGeneration.from_pretrained(folder, **load)
        return cls(model, EmoQProcessor.from_pretrained(folder), device=device, **kwargs)

    @cached_property
    def _candidates(self) -> list[list[int]]:
        return self.processor.label_candidates()

    # ------------------------------------------------------------------ audio in

    def load(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        """A path, encoded bytes (wav/mp3/mp4...), an array with `sample_rate`, or (array, sample_rate)."""
        if isinstance(audio, tuple):
            audio, sample_rate = audio
        if isinstance(audio, str | Path):
            return load_audio(audio, max_seconds=self.max_seconds)
        if isinstance(audio, bytes | bytearray):
            return load_audio_bytes(bytes(audio), max_seconds=self.max_seconds)
        array = np.asarray(audio, dtype=np.float32)
        if array.ndim == 2:
            array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
        if sample_rate is None:
            raise ValueError("an audio array needs its sample_rate")
        return resample(array, sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else array

    def _inputs(self, batch) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    # ------------------------------------------------------------------ classification

    @torch.no_grad()
    def score_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str | None] | None = None) -> torch.Tensor:
        """Label log-likelihoods [N, L] for already-loaded 16 kHz clips (one batch)."""
        b = self._inputs(self.processor(list(audios), transcripts=texts))
        return self.model.score_labels(
            b["input_ids"], b["attention_mask"], b["input_features"], self._candidates,
            b["feature_attention_mask"], b.get("transcript_ids"), b.get("transcript_attention_mask"),
        ).float().cpu()

    def classify(self, audio: AudioInput, text: str | None = None, sample_rate: int | None = None) -> dict:
        return self.classify_batch([self.load(audio, sample_rate)], [text])[0]

    def classify_batch(self, audios: Sequence, texts: Sequence[str | None] | None = None, batch_size: int = 8) -> list[dict]:
        """{label, scores: {label: probability}, log_likelihoods} per clip, in input order."""
        clips = [a if isinstance(a, np.ndarray) else self.load(a) for a in audios]
        texts = list(texts) if texts is not None else [None] * len(clips)
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))  # length grouping: less padding
        results: list[dict] = [{}] * len(clips)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores = self.score_batch([clips[i] for i in idx], [texts[i] for i in idx])
            for i, row in zip(idx, scores):
                results[i] = self._result(row)
        return results

    def _result(self, loglik: torch.Tensor) -> dict:
        probs = loglik.softmax(-1)
        return {
            "label": self.labels[int(loglik.argmax())],
            "scores": {label: float(p) for label, p in zip(self.labels, probs)},
            "log_likelihoods": {label: float(s) for label, s in zip(self.labels, loglik)},
        }

    # ------------------------------------------------------------------ chat

    def chat(self, audio: AudioInput, question: str | None, text: str | None = None, stream: bool = False,
             max_new_tokens: int = 64, sample_rate: int | None = None,
             history: Sequence[tuple[str, str]] = ()) -> str | Iterator[str]:
        """Free-form answer about one clip (greedy); `stream=True` yields text pieces as they are decoded.
        `question=None` asks the model's default question (the one it was trained on).

        `history`: the earlier (question, answer) turns of a conversation about this clip.
        """
        clip = self.load(audio, sample_rate)
        if stream:
            return self._stream(clip, question, text, max_new_tokens, history)
        return self.chat_batch([clip], [question], [text], max_new_tokens=max_new_tokens, histories=[history])[0]

    @torch.no_grad()
    def chat_batch(self, audios: Sequence[np.ndarray], questions: Sequence[str], texts=None,
                   max_new_tokens: int = 64, histories=None) -> list[str]:
        """Greedy answers for several clips at once (left padding: same answers as one by one)."""
        b = self._inputs(self.processor(list(audios), transcripts=texts, questions=list(questions), padding_side="left",
                                        histories=histories))
        out = self.model.generate(**b, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.processor.tokenizer.pad_token_id)
        return [t.strip() for t in self.processor.decode(out)]

    def _stream(self, audio: np.ndarray, question: str, text: str | None, max_new_tokens: int,
                history: Sequence[tuple[str, str]] = ()) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        b = self._inputs(self.processor([audio], transcripts=[text], questions=[question], padding_side="left",
                                        histories=[history]))
        kwargs = dict(**b, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                      pad_token_id=self.processor.tokenizer.pad_token_id)
        failure: list[BaseException] = []
        thread = threading.Thread(target=self._generate_into, args=(kwargs, streamer, failure), daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if failure:  # raised here, in the consumer's thread, instead of dying unseen in the generator's
            raise failure[0]

    @torch.no_grad()
    def _generate_into(self, kwargs: dict, streamer, failure: list) -> None:
        """Run generate for `_stream`; on an error, record it and end the stream so the reader never blocks."""
        try:
            self.model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            failure.append(err)
            streamer.end()


class BaselineRecognizer(EmotionRecognizer):
    """A classification baseline (Qieemo, Patamia) behind the same interface: `classify`, batches, eval.

    Scores are the classifier head's log-softmax (the baselines have no LLM to score label words with);
    chat-style answers need an EmoQ model and raise a clear error.
    """

    can_chat = False

    def __init__(self, model, processor, device=None, max_seconds: float | None = 30.0):
        super().__init__(model, processor, device=device, max_seconds=max_seconds)
        self.use_transcript = getattr(model, "text_encoder", None) is not None

    @torch.no_grad()
    def score_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str | None] | None = None) -> torch.Tensor:
        b = self._inputs(self.processor(list(audios), transcripts=texts))
        return self.model(**b).emotion_logits.float().log_softmax(-1).cpu()

    def chat(self, *args, **kwargs):
        raise ValueError(self.no_chat_message())

    def chat_batch(self, *args, **kwargs):
        raise ValueError(self.no_chat_message())

    def no_chat_message(self) -> str:
        return (f"a {self.model.config.model_type} model is a classifier: chat and free-text answers "
                "(emoq chat, eval --mode generate, /v1/chat/completions) need an EmoQ model; "
                "use classification (classify, eval --mode score, /v1/audio/emotion)")
