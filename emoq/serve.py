"""`emoq serve`: an OpenAI-compatible HTTP API around a trained model (FastAPI + uvicorn).

Endpoints:
  GET  /health               {"status": "ok", "model": NAME, "labels": [...]} (never needs the API key)
  GET  /v1/models            the served model, in OpenAI's list format
  POST /v1/chat/completions  OpenAI chat completions. The clip travels as a content part
                             {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}
                             (the latest one in the conversation is used); the question is the text of the
                             last user message. "stream": true answers with server-sent events. The
                             non-streaming answer adds an "emotion" field: {label, scores, transcript,
                             transcript_source} by label scoring. "truncate_prompt": "left" cuts a question
                             over the prompt budget to its last tokens instead of refusing it.
  POST /v1/audio/emotion     {"audio": BASE64, "format": "wav", "text": TRANSCRIPT} -> {"label", "scores",
                             "transcript", "transcript_source", "truncated_to", "model"} (label scoring, as
                             `emoq predict`; "format" and "text" are optional)

Transcripts: a model trained with them reads the clip's words. A request's "text" is used as given
(transcript_source "gold"); without one the clip is transcribed by the model's ASR model ("asr"; the run
config's model.asr, default builtin:whisper-tiny.en; null: none, "none"). A chat request carries no
transcript: its clip is transcribed the same way. A model trained without transcripts reads none ("none").

Truncation is never silent: a clip longer than the model reads (30 s) is cut to that length and the answer
says "truncated_to": 30.0 (null when the clip was read whole; in a stream, on the first chunk); a question
cut by "truncate_prompt": "left" gives "prompt_truncated": {"kept_tokens", "dropped_characters"} (else null).

Limits (each refusal comes early, before the work it would cost, and the server keeps serving):
  --max-upload-mb N            a request body over N MiB: 413, refused before it is decoded (default 25)
  --max-concurrent-uploads N   request bodies held in memory at once (until their answer is sent) add up
                               to at most N x --max-upload-mb; beyond: 503 with Retry-After (default 4)
  --max-prompt-tokens N        tokens the question may have, and the "text" sent to /v1/audio/emotion (it
                               goes into the prompt too) (default: the LLM's context length minus the
                               prompt frame with the longest clip's audio queries, minus the largest
                               max_tokens, 512); over it: 400 context_length_exceeded naming the limit and
                               the measured length, or the cut above. Text longer than 32 characters per
                               token of the limit is refused by its length, before tokenizing.
  --max-queue N                model calls admitted at once, waiting or running (default 16); beyond: 503
                               with Retry-After
  --request-timeout S          the longest a request waits for its turn on the model (default 60); past it:
                               503 with Retry-After, and its model call never runs
  --api-key KEY                (or the EMOQ_API_KEY environment variable) every endpoint but /health needs
                               "Authorization: Bearer KEY"; otherwise 401. Without a key the server only
                               listens on a loopback address (127.0.0.1, ::1, localhost).
  --shutdown-timeout S         on SIGTERM (or Ctrl-C) the server stops accepting connections, gives requests
                               in flight S seconds to finish (default 10), then cancels what is left (a 503
                               "shutting_down"; a stream ends with that error event); exit status 0
Abandoned work is dropped: a request whose client hung up before its turn never runs, and a generation
(streaming or not) whose client hung up ends at its next decoding step, not at max_tokens.

Errors have OpenAI's shape {"error": {"message", "type", "code"}}: 400 for malformed JSON, wrong types,
text that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800"), bad base64 or bytes that are
not audio (the message says which and why), 401 without the API key, 404 for another model name, 413 for a
body over --max-upload-mb, 503 (with Retry-After) when a limit above says busy, 500 when the model fails.
Audio only arrives as base64 bytes: a client cannot make the server open a file. Model calls run one at a
time on one worker thread (generation is not thread-safe) while the event loop stays free for uploads and
/health. The server listens on 127.0.0.1 unless --host says otherwise.

Examples:
  emoq serve --model runs/stage2/final --port 8000
  curl -H "Content-Type: application/json" -d "{\\"audio\\": \\"$(base64 -w0 clip.wav)\\"}" \\
       http://127.0.0.1:8000/v1/audio/emotion
  EMOQ_API_KEY=$(openssl rand -hex 16) emoq serve --model runs/stage2/final --host 0.0.0.0
  OpenAI SDK: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY or "unused"), model="emoq"
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints' annotations, and the
# endpoints (with their fastapi imports) live inside create_app so that building the CLI stays cheap.

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Literal

from .serve_limits import (
    DEFAULT_MAX_CONCURRENT_UPLOADS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT,
    ApiError,
    ApiKeyAuth,
    BodyLimit,
    ClientGone,
    ModelWorker,
    PromptBudget,
    error_body,
    error_kind,
)

logger = logging.getLogger("emoq.serve")

DEFAULT_MAX_UPLOAD_BYTES = 25 * 2**20
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 512
DEFAULT_SHUTDOWN_TIMEOUT = 10.0


# ------------------------------------------------------------------ request bodies
# Plain dataclasses (FastAPI validates them with pydantic) keep pydantic out of `emoq --help`.
# Fields OpenAI clients send that do not apply here (temperature, n, ...) are ignored.


@dataclass
class InputAudio:
    data: str  # base64 of the encoded file
    format: str | None = None  # "wav", "mp3", ...: which decoder to try first


@dataclass
class ContentPart:
    """{"type": "text", "text": ...} or {"type": "input_audio", "input_audio": {...}} (one class, not a
    union of two: pydantic then reports one error for a bad part instead of one per union member)."""

    type: Literal["text", "input_audio"]
    text: str | None = None
    input_audio: InputAudio | None = None


@dataclass
class ChatMessage:
    role: str
    content: str | list[ContentPart] | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer OpenAI name for max_tokens
    stream: bool = False
    truncate_prompt: Literal["left"] | None = None  # a question over the prompt budget: keep its last tokens


@dataclass
class EmotionRequest:
    audio: str  # base64 of the encoded file
    format: str | None = None
    text: str | None = None  # transcript; used when the model was trained with transcripts
    model: str | None = None


# ------------------------------------------------------------------ errors


_CODES = {404: "not_found", 405: "method_not_allowed"}


def _validation_message(errors) -> tuple[str, str]:
    """One readable line from pydantic's errors (the offending values are not echoed: they can be MBs)."""
    for err in errors:
        if err["type"] == "json_invalid":
            reason = err.get("ctx", {}).get("error", "cannot be parsed")
            return f"invalid JSON body: {reason} (at character {err['loc'][-1]})", "invalid_json"
    lines = []
    errors = sorted(errors, key=lambda err: -len(err["loc"]))  # deepest first: the most specific
    for err in errors[:4]:
        where = ".".join(str(part) for part in err["loc"][1:])
        if where:
            lines.append(f"{where}: {err['msg']}")
        else:
            lines.append(f"request body: {err['msg']} (send a JSON object with Content-Type: application/json)")
    more = f" (and {len(errors) - 4} more)" if len(errors) > 4 else ""
    return "; ".join(lines) + more, "invalid_request"


# ------------------------------------------------------------------ request text


def reject_lone_surrogates(value, where: str = "") -> None:
    """A 400 naming the first field whose text holds a lone UTF-16 surrogate.

    JSON can spell one ("\\ud800" without its pair) and Python's parser accepts it, but it is no Unicode
    character: it cannot be encoded as UTF-8, so the tokenizer (or the JSON answer echoing it) would fail
    with a 500 deep inside. Walks the parsed request body; ASCII text is skipped at C speed.
    """
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ApiError(400, f"{where or 'request body'}: text holds a lone UTF-16 surrogate "
                               f"({ascii(value[err.start])[1:-1]} at character {err.start}), which is not valid "
                               "Unicode; send text as UTF-8 (a \\uXXXX escape above U+FFFF needs both halves "
                               "of its pair)", "invalid_unicode") from None
    elif isinstance(value, list):
        for i, item in enumerate(value):
            reject_lone_surrogates(item, f"{where}.{i}" if where else str(i))
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            reject_lone_surrogates(getattr(value, field.name), f"{where}.{field.name}" if where else field.name)


# ------------------------------------------------------------------ audio in


def decode_audio(data: str, fmt: str | None, field: str, max_seconds: float | None):
    """Base64 text -> (16 kHz mono clip, `max_seconds` if the clip was cut to it else None), or a 400
    that names the field and the problem.

    Only the bytes in the request are decoded; nothing here ever opens a path a client sends.
    """
    from .audio import AudioError, load_audio_bytes

    if fmt is not None and not (fmt.isascii() and fmt.isalnum() and len(fmt) <= 8):
        raise ApiError(400, f"{field}: format must be a file extension such as 'wav' or 'mp3', got {fmt[:20]!r}",
                       "invalid_audio_format")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)  # line-wrapped base64 is fine
    except ValueError as err:  # binascii.Error, or non-ASCII text
        raise ApiError(400, f"{field} is not valid base64 ({err})", "invalid_base64") from None
    try:
        clip, info = load_audio_bytes(raw, max_seconds=max_seconds, name=f"{field}.{fmt}" if fmt else field,
                                      return_info=True)
    except AudioError as err:
        raise ApiError(400, str(err), "invalid_audio") from None
    return clip, (float(max_seconds) if info.truncated else None)


def conversation_input(messages: list[ChatMessage]) -> tuple[InputAudio, str | None]:
    """(audio, question) of a chat request: the latest audio part anywhere in the conversation (a
    follow-up question may refer to a clip sent earlier) and the text of the last user message.

    The model answers one question about one clip; earlier turns only matter for the audio they carry.
    No question text means the model's own default question (the one it was trained on).
    """
    from .models.emoq.configuration_emoq import PLACEHOLDER_TOKEN

    parts = [part for m in messages if isinstance(m.content, list) for part in m.content]
    if any(part.type == "input_audio" and part.input_audio is None for part in parts):
        raise ApiError(400, 'an "input_audio" content part needs "input_audio": {"data": BASE64, "format": ...}',
                       "invalid_request")
    audios = [part.input_audio for part in parts if part.type == "input_audio"]
    if not audios:
        raise ApiError(400, 'no audio in the conversation: add a content part {"type": "input_audio", '
                       '"input_audio": {"data": BASE64, "format": "wav"}} to a user message', "missing_audio")
    users = [m for m in messages if m.role == "user"]
    if not users:
        raise ApiError(400, "the conversation has no user message", "missing_user_message")
    content = users[-1].content
    texts = [content] if isinstance(content, str) else [p.text for p in content or [] if p.type == "text"]
    question = "\n".join(t.strip() for t in texts if t and t.strip())
    if PLACEHOLDER_TOKEN in question:  # the prompt marks where the audio goes with it: exactly once
        raise ApiError(400, f"the question must not contain {PLACEHOLDER_TOKEN} (the model's audio placeholder)",
                       "invalid_request")
    return audios[-1], question or None


def max_new_tokens(body: ChatRequest) -> int:
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = getattr(body, field)
    if requested is None:
        return DEFAULT_MAX_TOKENS
    if not 1 <= requested <= MAX_TOKENS_LIMIT:
        raise ApiError(400, f"{field} must be between 1 and {MAX_TOKENS_LIMIT}, got {requested}", "invalid_max_tokens")
    return requested


# ------------------------------------------------------------------ model calls


def stripped(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces of `"".join(pieces).strip()` as they come, so that the streamed answer is the same
    text as the non-streaming one (`EmotionRecognizer.chat` strips its answer)."""
    started, pending = False, ""
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        body = piece.rstrip()
        if body:
            yield pending + body
            pending = piece[len(body):]
        else:
            pending += piece


def generate_kwargs(recognizer, clip, question: str | None, transcript: str | None, max_tokens: int,
                    stop: threading.Event) -> dict:
    """`generate`'s arguments for one greedy answer, as `EmotionRecognizer.chat` builds them, plus a
    stopping criterion that ends the generation at the next decoding step once `stop` is set (the
    client left, the server shuts down): abandoned work costs one step, not max_tokens."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class UntilStopped(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    processor = recognizer.processor
    inputs = recognizer._inputs(processor([clip], transcripts=[transcript], questions=[question], padding_side="left"))
    return dict(**inputs, max_new_tokens=max_tokens, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([UntilStopped()]))


def stream_answer(recognizer, clip, question: str | None, max_tokens: int, stop: threading.Event) -> Iterator[str]:
    """The answer's pieces as they are decoded (`EmotionRecognizer.chat(stream=True)`, stoppable)."""
    from transformers import TextIteratorStreamer

    transcript = recognizer.transcripts([clip])[0]
    streamer = TextIteratorStreamer(recognizer.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
    kwargs = {**generate_kwargs(recognizer, clip, question, transcript.text, max_tokens, stop), "streamer": streamer}
    failure: list[BaseException] = []  # raised here, in the consumer's thread (as `EmotionRecognizer.chat` does)
    thread = threading.Thread(target=recognizer._generate_into, args=(kwargs, streamer, failure), daemon=True)
    thread.start()
    yield from stripped(streamer)
    thread.join()
    if failure:
        raise failure[0]


def complete(recognizer, clip, question: str | None, max_tokens: int, stop: threading.Event) -> tuple[str, dict, dict]:
    """(answer, emotion, usage) of one chat turn; runs on the model thread (it uses the tokenizer too).
    The clip is transcribed (when the model reads transcripts) once, for the answer and the scores."""
    import torch

    transcript = recognizer.transcripts([clip])[0]
    with torch.no_grad():
        out = recognizer.model.generate(**generate_kwargs(recognizer, clip, question, transcript.text, max_tokens,
                                                          stop))
    answer = recognizer.processor.decode(out)[0].strip()
    result = recognizer.classify_batch([clip], [transcript])[0]
    prompt_tokens = int(recognizer.processor([clip], transcripts=[transcript.text],
                                             questions=[question])["input_ids"].shape[1])
    completion_tokens = len(recognizer.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return answer, _emotion(result), usage


def _emotion(result: dict) -> dict:
    """The label, scores and transcript (with its source) of a classification result."""
    return {key: result[key] for key in ("label", "scores", "transcript", "transcript_source")}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_chunks(pieces: AsyncIterator[str], completion_id: str, created: int, model_name: str,
                     first: dict | None = None):
    """OpenAI's chunk stream: a role chunk (with the `first` fields), one chunk per piece, a `stop` chunk,
    then `data: [DONE]`.

    A failure after the headers went out can no longer be a 500 (nor a shutdown's 503): it is sent as an
    OpenAI error event and the stream ends without `[DONE]`.
    """

    def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})

    yield chunk({"role": "assistant", "content": ""}, **(first or {}))
    try:
        async for piece in pieces:
            yield chunk({"content": piece})
    except ApiError as err:  # cut by the server (its shutdown), not a failure
        yield _sse(error_body(err.message, err.code, error_kind(err.status)))
        return
    except Exception as err:
        logger.exception("streaming chat completion failed")
        yield _sse(error_body(f"inference failed: {type(err).__name__}: {err}", "inference_failed", "server_error"))
        return
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


@contextlib.asynccontextmanager
async def hang_up(request):
    """A task that completes when the client hangs up, while the request waits for the model.

    The body has been read by then, so the next message on the channel is the disconnect. The task is
    cancelled on leaving, before a streaming response starts listening on the same channel.
    """
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(disconnected())
    try:
        yield task
    finally:
        task.cancel()


# ------------------------------------------------------------------ the app


def create_app(recognizer, model_name: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, *,
               api_key: str | None = None, max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
               max_prompt_tokens: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
    """The FastAPI app serving `recognizer` (an `EmotionRecognizer`) as `model_name`; the other arguments
    are the limits of the module docstring (`api_key` None: no authentication)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    worker = ModelWorker(max_queue=max_queue, timeout=request_timeout)
    budget = PromptBudget.for_recognizer(recognizer, MAX_TOKENS_LIMIT, max_prompt_tokens) if recognizer.can_chat \
        else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.close()  # uvicorn's graceful shutdown is over: what still runs or waits is cancelled

    app = FastAPI(title="emoq", description=__doc__.split("\n\n")[0], version="1", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes, max_held_bytes=max_concurrent_uploads * max_upload_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, key=api_key)  # added last: runs first, before any body is read
    app.state.worker, app.state.budget = worker, budget
    started = int(time.time())
    use_transcript = recognizer.use_transcript

    async def api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.code, error_kind(exc.status)), status_code=exc.status,
                            headers=exc.headers)

    async def client_gone(request, exc: ClientGone):  # nobody reads it: the access log shows the hang-up
        return Response(status_code=499)

    async def http_error(request, exc: HTTPException):  # unknown routes, wrong methods
        code = _CODES.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code), status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request, exc: RequestValidationError):
        message, code = _validation_message(exc.errors())
        return JSONResponse(error_body(message, code), status_code=400)

    async def internal_error(request, exc: Exception):  # uvicorn logs the traceback (it gets `exc` too)
        message = f"internal error: {type(exc).__name__}: {exc}"
        return JSONResponse(error_body(message, "internal_error", "server_error"), status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model '{name}' not found: this server serves '{model_name}'", "model_not_found")

    def load(data: str, fmt: str | None, field: str):
        return run_in_threadpool(decode_audio, data, fmt, field, recognizer.max_seconds)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "labels": recognizer.labels}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "emoq"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        reject_lone_surrogates(body)
        check_model(body.model)
        if not recognizer.can_chat:  # a classification baseline: only /v1/audio/emotion applies
            raise ApiError(400, recognizer.no_chat_message(), "model_cannot_chat")
        max_tokens = max_new_tokens(body)
        audio, question = conversation_input(body.messages)
        question, cut = await run_in_threadpool(budget.fit, question, max_tokens, body.truncate_prompt)
        clip, truncated_to = await load(audio.data, audio.format, "input_audio")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        notes = {"truncated_to": truncated_to, "prompt_truncated": cut}
        async with hang_up(request) as gone:
            if body.stream:
                pieces = await worker.stream(partial(stream_answer, recognizer, clip, question, max_tokens), gone)
                return StreamingResponse(sse_chunks(pieces, completion_id, created, model_name, notes),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            answer, emotion, usage = await worker.call(partial(complete, recognizer, clip, question, max_tokens), gone)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": usage,
            "emotion": emotion,
            **notes,
        }

    @app.post("/v1/audio/emotion")
    async def audio_emotion(body: EmotionRequest, request: Request):
        reject_lone_surrogates(body)
        check_model(body.model)
        text = (body.text or None) if use_transcript else None  # none given: transcribed on the model thread
        if budget is not None:  # the transcript goes into the prompt
            text, _ = await run_in_threadpool(budget.fit, text, 0, None, '"text" (the transcript read with the clip)')
        clip, truncated_to = await load(body.audio, body.format, "audio")
        async with hang_up(request) as gone:
            result = (await worker.call(lambda stop: recognizer.classify_batch([clip], [text]), gone))[0]
        return {**_emotion(result), "truncated_to": truncated_to, "model": model_name}

    return app
