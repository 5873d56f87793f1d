"""One row scorer for `emoq eval` and `emoq predict`: every input gets a result, in input order.

A row whose audio cannot be loaded (missing, empty, not audio, a manifest row whose conversion failed)
becomes a result with status "error" and a message naming the file; it is never dropped. Rows are
loaded and scored a chunk at a time, so memory stays bounded on long lists, and results do not depend
on the chunking because `classify_batch` and `chat_batch` are batch invariant.

Transcripts (for a model that reads them; others get "none"), `transcripts=`:
  "gold"  the rows' own transcripts (a corpus's, a manifest's "text"); a row without one goes without
  "asr"   the rows' own transcripts are ignored: every clip is transcribed by the recognizer's ASR model
  "none"  no transcripts at all
  "auto"  the row's own transcript where it has one, the ASR model's for the others (`emoq predict`)
Each result records the transcript used and its source ("gold", "asr" or "none").

Under `accelerate launch` / `torchrun` with N processes, rank r scores rows r, r+N, r+2N, ... on its own
device and every rank gets all results back, in input order (`score_rows_sharded`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..labels import UNMAPPED, LabelSet

#: score: label scoring under the LLM; head: the classification head (an EmoQ stage-1 model, a baseline);
#: generate: the model's free answer mapped onto the labels
MODES = ("score", "head", "generate")
#: the transcript choices of `emoq eval --transcripts` (the first is the default)
TRANSCRIPT_MODES = ("gold", "asr", "none")


@dataclass
class Row:
    """One thing to classify: what the user named (`input`), where its audio is, an optional transcript and
    gold label, and an error already known before loading (a manifest row whose conversion failed)."""

    input: str
    audio: str | None
    key: str | None = None
    text: str | None = None
    gold: str | None = None
    error: str | None = None

    @classmethod
    def from_utterance(cls, u) -> Row:
        error = None
        if u.extra.get("status") == "error" or u.audio is None:
            error = u.extra.get("error") or f"{u.key}: no audio"
        return cls(input=str(u.audio) if u.audio is not None else u.key, audio=u.audio, key=u.key, text=u.text,
                   gold=u.label, error=error)


@dataclass
class RowResult:
    """The outcome for one row: a label and its scores (mode "score"), or a generated answer and the label
    it maps to (mode "generate", UNMAPPED when it names none), with the transcript the model read and its
    source ("gold", "asr", "none"); or status "error" and why. `truncated_to`: the seconds the clip was cut
    to before scoring (the recognizer's `max_seconds`), None when it was scored whole."""

    row: Row
    status: str = "ok"
    error: str | None = None
    label: str | None = None
    scores: dict | None = None
    answer: str | None = None
    transcript: str | None = None
    transcript_source: str | None = None
    truncated_to: float | None = None


def map_answer(answer: str | None, label_set: LabelSet | None) -> str:
    """A generated answer as a label of `label_set` (through its aliases), or UNMAPPED."""
    mapped = label_set.parse_free_text(answer) if label_set is not None else None
    return mapped or UNMAPPED


def score_rows(recognizer, rows: Sequence[Row], mode: str = "score", batch_size: int = 8,
               label_set: LabelSet | None = None, chunk_size: int | None = None,
               transcripts: str = "auto") -> Iterator[RowResult]:
    """Yield one RowResult per row, in input order. Mode "score" ranks the labels (`classify_batch`);
    "generate" asks the model's default question and maps the free answer through `label_set`.
    `transcripts`: one of `TRANSCRIPT_MODES` or "auto" (see the module docstring)."""
    from ..audio import AudioError

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "head":
        recognizer.scoring, mode = "head", "score"
    if transcripts not in (*TRANSCRIPT_MODES, "auto"):
        raise ValueError(f"transcripts must be one of {(*TRANSCRIPT_MODES, 'auto')}, got {transcripts!r}")
    if transcripts == "asr" and recognizer.use_transcript and not recognizer.can_transcribe:
        raise ValueError("transcripts='asr' needs an ASR model, and the recognizer has none (asr=None)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    chunk_size = chunk_size or max(8 * batch_size, 64)
    for start in range(0, len(rows), chunk_size):
        results, loaded, clips = [], [], []
        for row in rows[start : start + chunk_size]:
            result = RowResult(row)
            if row.error is not None:
                result.status, result.error = "error", row.error
            else:
                try:
                    clip, info = recognizer.load(row.audio, return_info=True)
                except AudioError as err:
                    result.status, result.error = "error", str(err)
                else:
                    if info is not None and info.truncated:
                        result.truncated_to = float(recognizer.max_seconds)
                    clips.append(clip)
                    loaded.append(result)
            results.append(result)
        if clips:
            texts = _transcripts(recognizer, clips, [r.row.text for r in loaded], transcripts)
            for result, text in zip(loaded, texts):
                result.transcript, result.transcript_source = text.text, text.source
            if mode == "score":
                for result, scored in zip(loaded, recognizer.classify_batch(clips, texts, batch_size=batch_size)):
                    result.label, result.scores = scored["label"], scored["scores"]
            else:
                _answer_rows(recognizer, loaded, clips, texts, batch_size, label_set)
        yield from results


def _transcripts(recognizer, clips, texts: list[str | None], mode: str):
    """The `Transcript` each clip is scored with under `mode` (resolved once, for both scoring modes)."""
    from ..inference import NO_TRANSCRIPT

    if mode == "none":
        return [NO_TRANSCRIPT] * len(clips)
    if mode == "asr":
        texts = [None] * len(clips)
    return recognizer.transcripts(clips, texts, transcribe=mode != "gold")


def _answer_rows(recognizer, results: list[RowResult], clips, texts, batch_size: int, label_set) -> None:
    """Generated answers for `results` (clips of similar length batched together), mapped onto labels."""
    question = recognizer.processor.default_question()
    order = sorted(range(len(clips)), key=lambda j: len(clips[j]))
    for start in range(0, len(order), batch_size):
        part = order[start : start + batch_size]
        answers = recognizer.chat_batch([clips[j] for j in part], [question] * len(part),
                                        [texts[j] for j in part], max_new_tokens=16)
        for j, answer in zip(part, answers):
            results[j].answer, results[j].label = answer, map_answer(answer, label_set)


def distributed_state(device: str | None):
    """accelerate's PartialState when launched with several processes (accelerate launch, torchrun,
    mpirun), else None: a single process never touches torch.distributed. Ranks use gloo on the CPU
    (no CUDA, ACCELERATE_USE_CPU=true or --device cpu), the accelerator's default backend otherwise."""
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    if get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = (parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
           or (device is not None and torch.device(device).type == "cpu"))
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))


def rank_device(state, device: str | None):
    """This rank's device: `device` if it names one exactly (e.g. cpu, cuda:1), else the rank's own."""
    import torch

    if state is None or (device is not None and (torch.device(device).type == "cpu" or ":" in device)):
        return device
    return "cpu" if state.device.type == "cpu" else str(state.device)


def score_rows_sharded(recognizer, rows: Sequence[Row], state, **kwargs) -> list[RowResult]:
    """`score_rows` over the ranks of `state` (None: this process alone): rank r scores rows r, r+N, ...;
    every rank gets all results back, in input order."""
    if state is None or state.num_processes == 1:
        return list(score_rows(recognizer, rows, **kwargs))
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, len(rows), state.num_processes))
    results = score_rows(recognizer, [rows[i] for i in mine], **kwargs)
    gathered = gather_object(list(zip(mine, results)))
    by_index = dict(gathered)
    if len(gathered) != len(rows) or sorted(by_index) != list(range(len(rows))):
        raise RuntimeError(f"gathered {len(gathered)} results for {len(rows)} rows")
    return [by_index[i] for i in range(len(rows))]
