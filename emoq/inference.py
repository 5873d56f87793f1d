"""EmotionRecognizer: what users do with a trained model — classify clips, ask chat-style questions.

`classify` never generates free text: it scores each label's answer under the LLM (`score_labels`)
and returns the distribution, so results do not depend on decoding and cannot be a hallucinated
label. Batches are length-grouped (similar durations together) and returned in input order; a
clip's result is the same whatever else is in its batch.

Transcripts: a model trained with them (`use_transcript`) reads each clip's words next to its audio. A
transcript given by the caller is used as is ("gold"); a clip without one (None or blank) is transcribed
by the recognizer's ASR model ("asr", see `emoq.asr`) when one is configured, else it goes without
("none"). Every classification result says which it was (`transcript`, `transcript_source`); a model
that does not use transcripts ignores them ("none"). `transcripts()` does the same for callers that want
the words before asking (e.g. once per clip for a whole conversation).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .audio import SAMPLE_RATE, is_stored_clip, load_audio, load_audio_bytes, resample

AudioInput = str | Path | bytes | np.ndarray | tuple
BASELINE_MODEL_TYPES = ("qieemo", "patamia")
#: where a clip's transcript came from: given by the caller, transcribed by the ASR model, or none used
TRANSCRIPT_SOURCES = ("gold", "asr", "none")
#: `from_pretrained(asr=...)` default: the `model.asr` of the training run's config
FROM_RUN_CONFIG = "<run config>"


class Transcript(NamedTuple):
    """The transcript a clip was classified with, and where it came from (one of `TRANSCRIPT_SOURCES`).
    Passed as a clip's text, it is used as it is (its source kept): no second transcription."""

    text: str | None
    source: str


NO_TRANSCRIPT = Transcript(None, "none")


class ModelFolderError(ValueError):
    """A model folder whose config.json is not an emoq model's (broken, or another library's model): the message
    names the file and the problem, where loading it would fail deep inside transformers."""


def weights_folder(path: str | Path) -> Path:
    """Accept a training output (`.../final`) or the `weights/` folder inside it, holding an emoq model (EmoQ or
    a baseline): a missing folder is a FileNotFoundError, a foreign or broken config.json a ModelFolderError."""
    path = Path(path)
    if (path / "weights" / "config.json").is_file():
        folder = path / "weights"
    elif (path / "config.json").is_file():
        folder = path
    else:
        raise FileNotFoundError(f"{path}: no EmoQ model here (expected config.json or weights/config.json)")
    model_type(folder)
    return folder


def model_type(folder: Path) -> str:
    """The model_type of an emoq model folder's config.json, checked to be one emoq loads."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelFolderError(f"{config}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{config}: not valid JSON ({err})") from None
    known = ("emoq", *BASELINE_MODEL_TYPES)
    found = data.get("model_type") if isinstance(data, dict) else None
    if found not in known:
        what = f"a {found!r} model" if found else "no model_type"
        raise ModelFolderError(f"{config}: describes {what}, not an emoq model (model_type {', '.join(known)}); "
                               "point --model at an emoq training output or export")
    return found


def run_config_asr(folder: str | Path) -> str | None:
    """The ASR model named by the `run_config.yaml` saved next to the weights (`model.asr`): the config's
    default when the run config predates the field, None when there is no run config or it says null."""
    import yaml

    from .asr import DEFAULT_ASR, asr_ref

    path = Path(folder) / "run_config.yaml"
    if not path.is_file():
        return None
    model = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
    return asr_ref(model.get("asr", DEFAULT_ASR))


class EmotionRecognizer:
    #: whether `chat` / `chat_batch` can answer in free text (EmoQ: yes; the classifier baselines: no)
    can_chat = True

    def __init__(self, model, processor, device: str | torch.device | None = None, max_seconds: float | None = 30.0,
                 asr: str | None = None, transcriber=None):
        """`asr`: the ASR model that transcribes clips given without a transcript (a reference for
        `emoq.asr.Transcriber.from_pretrained`, loaded on first need; None or "none": never transcribe).
        `transcriber`: a ready object with `transcribe(clips) -> list[str]` to use instead."""
        from .asr import asr_ref

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.labels = list(model.config.id2label.values())
        self.max_seconds = max_seconds
        self.use_transcript = bool(getattr(model.config, "use_transcript", False))
        self.asr = asr_ref(asr)
        if transcriber is not None and self.asr is None:
            self.asr = getattr(transcriber, "name", None) or type(transcriber).__name__
        self._transcriber = transcriber
        self._transcriber_lock = threading.Lock()
        self.scoring = "llm"  # or "head": see score_batch

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype: torch.dtype | None = None,
                        asr: str | None = FROM_RUN_CONFIG, **kwargs):
        """Any trained emoq model folder: EmoQ, or a baseline (Qieemo, Patamia), chosen by its config.

        `asr`: the ASR model for clips without a transcript; by default the `model.asr` of the training
        run's `run_config.yaml` next to the weights (a folder without one: no ASR); None or "none": no ASR."""
        folder = weights_folder(path)
        load = {"dtype": dtype} if dtype else {}
        kwargs["asr"] = run_config_asr(folder) if asr == FROM_RUN_CONFIG else asr
        if model_type(folder) in BASELINE_MODEL_TYPES:
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

    # ------------------------------------------------------------------ transcripts

    @property
    def can_transcribe(self) -> bool:
        """Whether clips without a transcript get one: the model reads transcripts and an ASR model is set."""
        return self.use_transcript and (self._transcriber is not None or self.asr is not None)

    @property
    def transcriber(self):
        """The ASR model (`emoq.asr.Transcriber`), loaded on first use; None when none is configured."""
        with self._transcriber_lock:
            if self._transcriber is None and self.asr is not None:
                from .asr import Transcriber

                self._transcriber = Transcriber.from_pretrained(self.asr, device=self.device)
            return self._transcriber

    def transcripts(self, clips: Sequence[np.ndarray], texts: Sequence | None = None,
                    transcribe: bool = True) -> list[Transcript]:
        """The transcript each clip is to be classified with, and its source.

        `texts[i]`: a string ("gold"), a `Transcript` (kept as it is), or None / blank: missing. Missing ones
        are transcribed together (one ASR call) when `transcribe` and `can_transcribe`, else "none". A model
        that does not use transcripts gets "none" for every clip, given text or not."""
        texts = list(texts) if texts is not None else [None] * len(clips)
        if len(texts) != len(clips):
            raise ValueError(f"{len(texts)} transcripts for {len(clips)} clips")
        if not self.use_transcript:
            return [NO_TRANSCRIPT] * len(clips)
        resolved, missing = [], []
        for i, text in enumerate(texts):
            if isinstance(text, Transcript):
                resolved.append(text)
            elif text is None or not str(text).strip():
                resolved.append(NO_TRANSCRIPT)
                missing.append(i)
            else:
                resolved.append(Transcript(str(text), "gold"))
        if missing and transcribe and self.can_transcribe:
            heard = self.transcriber.transcribe([clips[i] for i in missing])
            for i, text in zip(missing, heard, strict=True):
                resolved[i] = Transcript(text, "asr")
        return resolved

    # ------------------------------------------------------------------ audio in

    def load(self, audio: AudioInput, sample_rate: int | None = None, *, return_info: bool = False):
        """A path, encoded bytes (wav/mp3/mp4...), an array with `sample_rate`, or (array, sample_rate).

        `return_info`: (clip, `AudioInfo`) instead, whose `truncated` says the clip was cut to `max_seconds`
        (the info is None for an array, which is taken as it is)."""
        if isinstance(audio, tuple):
            audio, sample_rate = audio
        if isinstance(audio, str | Path) or is_stored_clip(audio):
            return load_audio(audio, max_seconds=self.max_seconds, return_info=return_info)
        if isinstance(audio, bytes | bytearray):
            return load_audio_bytes(bytes(audio), max_seconds=self.max_seconds, return_info=return_info)
        array = np.asarray(audio, dtype=np.float32)
        if array.ndim == 2:
            array = array.mean(axis=0 if array.shape[0] < array.shape[1] else 1)
        if sample_rate is None:
            raise ValueError("an audio array needs its sample_rate")
        clip = resample(array, sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else array
        return (clip, None) if return_info else clip

    def _inputs(self, batch) -> dict:
        return {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    # ------------------------------------------------------------------ classification

    @torch.no_grad()
    def score_batch(self, audios: Sequence[np.ndarray], texts: Sequence[str | None] | None = None) -> torch.Tensor:
        """Label log-likelihoods [N, L] for already-loaded 16 kHz clips (one batch): under the LLM, or with
        `scoring = "head"` the EmoQ-Former's classification head (log-softmax), which needs no trained LLM —
        how a stage-1 model is scored."""
        b = self._inputs(self.processor(list(audios), transcripts=texts))
        if self.scoring == "head":
            speech = {k: v for k, v in b.items() if k.startswith(("input_features", "feature_", "transcript_"))}
            return self.model(**speech).emotion_logits.float().log_softmax(-1).cpu()
        return self.model.score_labels(
            b["input_ids"], b["attention_mask"], b["input_features"], self._candidates,
            b["feature_attention_mask"], b.get("transcript_ids"), b.get("transcript_attention_mask"),
        ).float().cpu()

    def classify(self, audio: AudioInput, text: str | Transcript | None = None, sample_rate: int | None = None,
                 transcribe: bool = True) -> dict:
        return self.classify_batch([self.load(audio, sample_rate)], [text], transcribe=transcribe)[0]

    def classify_batch(self, audios: Sequence, texts: Sequence[str | Transcript | None] | None = None,
                       batch_size: int = 8, transcribe: bool = True) -> list[dict]:
        """{label, scores: {label: probability}, log_likelihoods, transcript, transcript_source} per clip, in
        input order. Clips without a transcript are transcribed first when the model reads transcripts and
        an ASR model is configured (`transcribe=False`: they go without); see `transcripts`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        clips = [a if isinstance(a, np.ndarray) else self.load(a) for a in audios]
        used = self.transcripts(clips, texts, transcribe=transcribe)
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))  # length grouping: less padding
        results: list[dict] = [{}] * len(clips)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores = self.score_batch([clips[i] for i in idx], [used[i].text for i in idx])
            for i, row in zip(idx, scores):
                results[i] = self._result(row, used[i])
        return results

    def _result(self, loglik: torch.Tensor, transcript: Transcript = NO_TRANSCRIPT) -> dict:
        probs = loglik.softmax(-1)
        return {
            "label": self.labels[int(loglik.argmax())],
            "scores": {label: float(p) for label, p in zip(self.labels, probs)},
            "log_likelihoods": {label: float(s) for label, s in zip(self.labels, loglik)},
            "transcript": transcript.text,
            "transcript_source": transcript.source,
        }

    # ------------------------------------------------------------------ chat

    def chat(self, audio: AudioInput, question: str | None, text: str | Transcript | None = None, stream: bool = False,
             max_new_tokens: int = 64, sample_rate: int | None = None,
             history: Sequence[tuple[str, str]] = (), transcribe: bool = True) -> str | Iterator[str]:
        """Free-form answer about one clip (greedy); `stream=True` yields text pieces as they are decoded.
        `question=None` asks the model's default question (the one it was trained on).

        `history`: the earlier (question, answer) turns of a conversation about this clip.
        `text`: the clip's transcript; without one, the clip is transcribed as in `classify_batch`. The answer
        does not say which transcript was used: call `transcripts` first and pass its result as `text`.
        """
        clip = self.load(audio, sample_rate)
        text = self.transcripts([clip], [text], transcribe=transcribe)[0]
        if stream:
            return self._stream(clip, question, text.text, max_new_tokens, history)
        return self.chat_batch([clip], [question], [text], max_new_tokens=max_new_tokens, histories=[history])[0]

    @torch.no_grad()
    def chat_batch(self, audios: Sequence[np.ndarray], questions: Sequence[str], texts=None,
                   max_new_tokens: int = 64, histories=None, transcribe: bool = True) -> list[str]:
        """Greedy answers for several clips at once (left padding: same answers as one by one); transcripts
        as in `classify_batch`."""
        texts = [t.text for t in self.transcripts(audios, texts, transcribe=transcribe)]
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
    chat-style answers need an EmoQ model and raise a clear error. A baseline with a text branch
    (Patamia with a text encoder) reads transcripts, and missing ones are transcribed, as for EmoQ.
    """

    can_chat = False

    def __init__(self, model, processor, device=None, max_seconds: float | None = 30.0, **kwargs):
        super().__init__(model, processor, device=device, max_seconds=max_seconds, **kwargs)
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
