"""`emoq serve`: an OpenAI-compatible HTTP API around a trained model (FastAPI + uvicorn).

Endpoints:
  GET  /health               {"status": "ok", "model": NAME, "labels": [...]}
  GET  /v1/models            the served model, in OpenAI's list format
  POST /v1/chat/completions  OpenAI chat completions. The clip travels as a content part
                             {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}
                             (the latest one in the conversation is used); the question is the text of the
                             last user message. "stream": true answers with server-sent events. The
                             non-streaming answer adds an "emotion" field: {label, scores, transcript,
                             transcript_source} by label scoring.
  POST /v1/audio/emotion     {"audio": BASE64, "format": "wav", "text": TRANSCRIPT} -> {"label", "scores",
                             "transcript", "transcript_source", "model"} (label scoring, as `emoq predict`;
                             "format" and "text" are optional)

Transcripts: a model trained with them reads the clip's words. A request's "text" is used as given
(transcript_source "gold"); without one the clip is transcribed by the model's ASR model ("asr"; the run
config's model.asr, default builtin:whisper-tiny.en; null: none, "none"). A chat request carries no
transcript: its clip is transcribed the same way. A model trained without transcripts reads none ("none").

Errors have OpenAI's shape {"error": {"message", "type", "code"}}: 400 for malformed JSON, wrong types,
bad base64 or bytes that are not audio (the message says which and why), 404 for another model name,
413 for a body over --max-upload-mb (refused before it is decoded), 500 when the model fails; the
server keeps serving after each. Audio only arrives as base64 bytes: a client cannot make the server
open a file. Model calls run one at a time on one worker thread (generation is not thread-safe) while
the event loop stays free for uploads and /health. The server listens on 127.0.0.1 unless --host says
otherwise.

Examples:
  emoq serve --model runs/stage2/final --port 8000
  curl -H "Content-Type: application/json" -d "{\\"audio\\": \\"$(base64 -w0 clip.wav)\\"}" \\
       http://127.0.0.1:8000/v1/audio/emotion
  OpenAI SDK: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused"), model="emoq"
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints' annotations, and the
# endpoints (with their fastapi imports) live inside create_app so that building the CLI stays cheap.

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Literal

from .audio import SAMPLE_RATE

logger = logging.getLogger("emoq.serve")

DEFAULT_MAX_UPLOAD_BYTES = 25 * 2**20
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 512


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


@dataclass
class EmotionRequest:
    audio: str  # base64 of the encoded file
    format: str | None = None
    text: str | None = None  # transcript; used when the model was trained with transcripts
    model: str | None = None


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """A refused request: rendered as OpenAI's error shape with `status` and a machine-readable `code`."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_body(message: str, code: str | None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


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


# ------------------------------------------------------------------ body size limit


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get a 413 before anything decodes them.

    A declared Content-Length over the limit is refused without reading the body. Otherwise the body
    (chunked or not) is read here, counted as it arrives and refused as soon as it passes the limit, so
    a client cannot make the server buffer more than `max_bytes`; the app then gets the body in one piece.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the body once, then the real channel (a streaming response awaits disconnects)
            return body.pop() if body else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        from starlette.responses import JSONResponse

        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await JSONResponse(error_body(message, "request_too_large"), status_code=413)(scope, receive, send)


# ------------------------------------------------------------------ audio in


def decode_audio(data: str, fmt: str | None, field: str, max_seconds: float | None):
    """Base64 text -> 16 kHz mono clip, or a 400 that names the field and the problem.

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
        return load_audio_bytes(raw, max_seconds=max_seconds, name=f"{field}.{fmt}" if fmt else field)
    except AudioError as err:
        raise ApiError(400, str(err), "invalid_audio") from None


def conversation_input(messages: list[ChatMessage]) -> tuple[InputAudio, str | None]:
    """(audio, question) of a chat request: the latest audio part anywhere in the conversation (a
    follow-up question may refer to a clip sent earlier) and the text of the last user message.

    The model answers one question about one clip; earlier turns only matter for the audio they carry.
    No question text means the model's own default question (the one it was trained on).
    """
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


class ModelWorker:
    """Runs model calls one at a time, in arrival order, on one dedicated thread.

    Why one thread: `generate` (and a tokenizer shared with it) is not thread-safe. A lock taken inside
    the thread pool would also park one pool thread per waiting request; a single-thread executor
    queues the waiting calls instead, and the event loop stays free (uploads, /health) while it works.
    """

    _END = object()

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emoq-model")

    async def call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args, **kwargs))

    async def stream(self, make_pieces: Callable[[], Iterator[str]]) -> AsyncIterator[str]:
        """The pieces of `make_pieces()`, as the model thread produces them.

        The model thread runs the generator to its end even when the client goes away, so the next call
        never overlaps a generation still running in the background; a failure is re-raised here.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce():
            try:
                for piece in make_pieces():
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                last = self._END
            except Exception as err:
                last = err
            loop.call_soon_threadsafe(queue.put_nowait, last)

        future = self._executor.submit(produce)
        try:
            while (item := await queue.get()) is not self._END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            future.cancel()  # a client that left before its turn: its generation never starts


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


def stream_answer(recognizer, clip, question: str | None, max_tokens: int) -> Iterator[str]:
    return stripped(recognizer.chat((clip, SAMPLE_RATE), question, stream=True, max_new_tokens=max_tokens))


def complete(recognizer, clip, question: str | None, max_tokens: int) -> tuple[str, dict, dict]:
    """(answer, emotion, usage) of one chat turn; runs on the model thread (it uses the tokenizer too).
    The clip is transcribed (when the model reads transcripts) once, for the answer and the scores."""
    transcript = recognizer.transcripts([clip])[0]
    answer = recognizer.chat((clip, SAMPLE_RATE), question, text=transcript, max_new_tokens=max_tokens)
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


async def sse_chunks(pieces: AsyncIterator[str], completion_id: str, created: int, model_name: str):
    """OpenAI's chunk stream: a role chunk, one chunk per piece, a `stop` chunk, then `data: [DONE]`.

    A failure after the headers went out can no longer be a 500: it is sent as an OpenAI error event
    and the stream ends without `[DONE]`.
    """

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in pieces:
            yield chunk({"content": piece})
    except Exception as err:
        logger.exception("streaming chat completion failed")
        yield _sse(error_body(f"inference failed: {type(err).__name__}: {err}", "inference_failed", "server_error"))
        return
    yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------ the app


def create_app(recognizer, model_name: str, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
    """The FastAPI app serving `recognizer` (an `EmotionRecognizer`) as `model_name`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="emoq", description=__doc__.split("\n\n")[0], version="1")
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    worker = ModelWorker()
    started = int(time.time())
    use_transcript = recognizer.use_transcript

    async def api_error(request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.code), status_code=exc.status)

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
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        if not recognizer.can_chat:  # a classification baseline: only /v1/audio/emotion applies
            raise ApiError(400, recognizer.no_chat_message(), "model_cannot_chat")
        max_tokens = max_new_tokens(body)
        audio, question = conversation_input(body.messages)
        clip = await load(audio.data, audio.format, "input_audio")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            pieces = partial(stream_answer, recognizer, clip, question, max_tokens)
            return StreamingResponse(sse_chunks(worker.stream(pieces), completion_id, created, model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answer, emotion, usage = await worker.call(complete, recognizer, clip, question, max_tokens)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": usage,
            "emotion": emotion,
        }

    @app.post("/v1/audio/emotion")
    async def audio_emotion(body: EmotionRequest):
        check_model(body.model)
        clip = await load(body.audio, body.format, "audio")
        text = (body.text or None) if use_transcript else None  # none given: transcribed on the model thread
        result = (await worker.call(recognizer.classify_batch, [clip], [text]))[0]
        return {**_emotion(result), "model": model_name}

    return app
