"""Request admission for `emoq serve`: who may call, how much the server holds at once, how long a question may be.

Every limit here refuses early and cheaply, in OpenAI's error shape, so that one client cannot take the
server from the others: an unknown caller before its body is read (`ApiKeyAuth`), a body over the size or
memory budget before it is decoded (`BodyLimit`), a model call beyond the queue or past its deadline before
it runs (`ModelWorker`), a question over the prompt budget before it reaches the LLM (`PromptBudget`).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

DEFAULT_MAX_QUEUE = 16
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_MAX_CONCURRENT_UPLOADS = 4
#: context length assumed for an LLM whose config does not state one
DEFAULT_CONTEXT = 2048
LOOPBACK_NAMES = ("localhost",)


# ------------------------------------------------------------------ errors


class ApiError(Exception):
    """A refused request: rendered as OpenAI's error shape with `status`, a machine-readable `code` and,
    for the 401 and 503 answers, the headers that tell a client what to do next."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def error_body(message: str, code: str | None, kind: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind or "invalid_request_error", "code": code}}


def error_kind(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


async def send_error(scope, receive, send, error: ApiError) -> None:
    """Answer `error` straight from an ASGI middleware (before the app and its exception handlers)."""
    from starlette.responses import JSONResponse

    response = JSONResponse(error_body(error.message, error.code, error_kind(error.status)),
                            status_code=error.status, headers=error.headers)
    await response(scope, receive, send)


def busy(message: str, code: str, retry_after: int) -> ApiError:
    return ApiError(503, f"{message}; retry in {retry_after} s", code, {"Retry-After": str(retry_after)})


# ------------------------------------------------------------------ who may call


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: whatever it resolves to, it is not known to be loopback
        return False


class ApiKeyAuth:
    """ASGI middleware: every request except the health check needs `Authorization: Bearer KEY`.

    Checked before the body is read, so an unknown caller cannot make the server buffer an upload; the
    key is compared with `hmac.compare_digest`, whose time does not depend on how much of a guess matched.
    """

    OPEN_PATHS = ("/health",)

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        problem = "invalid API key" if given else "missing API key"
        await send_error(scope, receive, send, ApiError(
            401, f"{problem}: send the header 'Authorization: Bearer KEY' with the server's API key",
            "invalid_api_key", {"WWW-Authenticate": "Bearer"}))


# ------------------------------------------------------------------ how much is held


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get a 413 before anything decodes them, and the
    bodies held at once add up to at most `max_held_bytes` (more get a 503 with Retry-After).

    A declared Content-Length over the limit is refused without reading the body. Otherwise the body
    (chunked or not) is read here, counted as it arrives and refused as soon as it passes the limit, so
    a client cannot make the server buffer more than `max_bytes`; the app then gets the body in one piece.
    A body stays in memory (several copies: bytes, JSON, decoded audio) until its answer is sent, also
    while it waits for the model: the held total is what bounds the server's memory, whatever the number
    of clients. A declared length is reserved before reading, a chunked body as it arrives.
    """

    def __init__(self, app, max_bytes: int, max_held_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_held_bytes = max_held_bytes
        self.held = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        reserved = 0
        try:
            chunks, size, more = [], 0, True
            if declared.isdigit() and not self._reserve(int(declared)):
                return await send_error(scope, receive, send, self._full())
            reserved = int(declared) if declared.isdigit() else 0
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    return await self._refuse(scope, receive, send)
                if size > reserved:
                    if not self._reserve(size - reserved):
                        return await send_error(scope, receive, send, self._full())
                    reserved = size
                more = message.get("more_body", False)
            body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
            del chunks

            async def replay():  # the body once, then the real channel (a streaming response awaits disconnects)
                return body.pop() if body else await receive()

            await self.app(scope, replay, send)
        finally:
            self.held -= reserved

    def _reserve(self, size: int) -> bool:
        if self.max_held_bytes is not None and size and self.held + size > self.max_held_bytes:
            return False
        self.held += size
        return True

    def _full(self) -> ApiError:
        return busy(f"the server holds as many uploads as it may ({self.max_held_bytes} bytes of request bodies, "
                    "--max-concurrent-uploads)", "too_many_uploads", 1)

    async def _refuse(self, scope, receive, send):
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        await send_error(scope, receive, send, ApiError(413, message, "request_too_large"))


# ------------------------------------------------------------------ the model queue


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


_END = object()


class ModelWorker:
    """Runs model calls one at a time, in arrival order, on one dedicated thread, behind a bounded queue.

    Why one thread: `generate` (and a tokenizer shared with it) is not thread-safe. A lock taken inside
    the thread pool would also park one pool thread per waiting request; a single-thread executor
    queues the waiting calls instead, and the event loop stays free (uploads, /health) while it works.

    Why bounded: every call makes all the calls behind it wait its full length, so work that nobody
    waits for any more is dropped instead of done. At most `max_queue` calls are admitted (waiting or
    running; more get a 503 with Retry-After); a call whose turn has not come `timeout` s after it was
    admitted is dropped (503); a call whose client hung up before its turn never runs; a running call
    gets its `stop` event set when its client leaves (a generation ends at its next decoding step).
    `close` (the server's shutdown deadline) ends everything the same way, each with a 503 answer.
    Each call is `fn(stop)`.
    """

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE, timeout: float = DEFAULT_REQUEST_TIMEOUT):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emoq-model")
        self.max_queue, self.timeout = max_queue, timeout
        self.closed = False
        self._jobs: dict[Future, tuple[threading.Event, asyncio.Future]] = {}
        self._seconds = 1.0  # running mean of a call's length, for Retry-After

    @property
    def pending(self) -> int:
        """Calls admitted and not finished: waiting for their turn or running."""
        return len(self._jobs)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the calls in it times a call's mean length."""
        return max(1, math.ceil(self._seconds * max(1, self.pending)))

    async def call(self, fn: Callable[[threading.Event], object], gone: Awaitable | None = None):
        """`fn(stop)` on the model thread, once its turn comes; `gone` completes when the client hangs up."""
        stop = threading.Event()
        future, started = self._submit(fn, stop)
        try:
            await self._turn(future, started, gone)
            result = asyncio.wrap_future(future)
            done, _ = await asyncio.wait([result, gone] if gone else [result], return_when=asyncio.FIRST_COMPLETED)
            if result not in done:
                raise ClientGone
            if self.closed:  # stopped part-way by the shutdown: not the answer asked for
                raise self._shutting_down()
            return result.result()
        finally:
            if not future.done():  # the client left, or the request was cancelled
                stop.set()
                future.cancel()

    async def stream(self, make_pieces: Callable[[threading.Event], Iterator[str]],
                     gone: Awaitable | None = None) -> AsyncIterator[str]:
        """Waits for the turn of `make_pieces(stop)` as `call` does (same refusals: they can still be a
        status code), then returns its pieces as the model thread produces them. Leaving the iterator
        (the client left) or dropping it unstarted sets `stop`, so the generation ends at its next step;
        a stream cut by the shutdown ends with an `ApiError` instead of its last piece."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def produce(stop: threading.Event) -> None:
            try:
                for piece in make_pieces(stop):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
                last = _END
            except Exception as err:
                last = err
            loop.call_soon_threadsafe(queue.put_nowait, last)

        stop = threading.Event()
        future, started = self._submit(produce, stop)
        try:
            await self._turn(future, started, gone)
        except BaseException:
            stop.set()
            future.cancel()
            raise
        pieces = self._pieces(queue, stop)
        weakref.finalize(pieces, stop.set)
        return pieces

    async def _pieces(self, queue: asyncio.Queue, stop: threading.Event) -> AsyncIterator[str]:
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
            if self.closed and stop.is_set():
                raise self._shutting_down()
        finally:
            stop.set()

    def close(self) -> None:
        """The server's shutdown deadline: queued calls never start (their requests get a 503), a running
        generation ends at its next step. Runs on the event loop."""
        self.closed = True
        for future, (stop, started) in list(self._jobs.items()):
            stop.set()
            future.cancel()
            if not started.done():
                started.set_result(False)  # wakes the request waiting for its turn
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn, stop: threading.Event) -> tuple[Future, asyncio.Future]:
        if self.closed:
            raise self._shutting_down()
        if self.pending >= self.max_queue:
            raise busy(f"the server is busy: {self.pending} requests are waiting for the model or running on it "
                       f"(--max-queue {self.max_queue})", "queue_full", self.retry_after())
        loop = asyncio.get_running_loop()
        started = loop.create_future()  # True: the model thread took the call up; False: the server closed

        def run():
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(True))
            begun = time.monotonic()
            try:
                return fn(stop)
            finally:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - begun)

        future = self._executor.submit(run)
        self._jobs[future] = stop, started
        future.add_done_callback(lambda done: self._jobs.pop(done, None))
        return future, started

    async def _turn(self, future: Future, started: asyncio.Future, gone: Awaitable | None) -> None:
        """Until the model thread takes up `future`; dropped first if the deadline passes, the client
        leaves or the server shuts down."""
        waits = [started, gone] if gone else [started]
        done, _ = await asyncio.wait(waits, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
        if started.done() and started.result() or not started.done() and not future.cancel():
            return  # a call that has started runs on
        if self.closed:
            raise self._shutting_down()
        if gone is not None and gone in done:
            raise ClientGone
        raise busy(f"the request waited {self.timeout:g} s without its turn on the model coming "
                   "(--request-timeout); the server is overloaded", "queue_timeout", self.retry_after())

    @staticmethod
    def _shutting_down() -> ApiError:
        return ApiError(503, "the server is shutting down: the request was cancelled before its answer was "
                        "complete", "shutting_down")


# ------------------------------------------------------------------ how long a question may be


QUESTION = "the question (the text of the last user message)"


class PromptBudget:
    """How many tokens the text a client puts into the prompt may have: the question of a chat (the text
    of the last user message), or the transcript sent with a clip to classify (it goes into the prompt
    too). Its length is what a model call costs, and the rest of the prompt is fixed.

    The limit is `--max-prompt-tokens`, by default what the LLM's context leaves after the prompt frame
    (template, system prompt, the audio queries of the longest clip, room for a transcript) and the
    largest answer; a request's own max_tokens can lower it further. A longer text is refused with a 400
    that names the limit and its length, or (a question) cut to its last tokens when the request says
    `"truncate_prompt": "left"`. Text longer than any within the budget could be (more than
    `MAX_CHARS_PER_TOKEN` characters a token) is refused by its length alone, and truncation tokenizes
    only the tail that can be kept: a megabyte of text costs a string length, not a tokenizer pass.
    Tokens are counted with a private copy of the model's tokenizer (the model thread uses the original).
    """

    MAX_CHARS_PER_TOKEN = 32

    def __init__(self, tokenizer, limit: int, context: int, frame: int):
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.limit, self.context, self.frame = limit, context, frame

    @classmethod
    def for_recognizer(cls, recognizer, answer_tokens: int, limit: int | None = None) -> PromptBudget:
        """The budget of `recognizer`'s LLM; `answer_tokens`: the largest max_tokens a request may ask for."""
        context = getattr(recognizer.model.config.text_config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        frame = prompt_frame(recognizer)
        return cls(recognizer.processor.tokenizer, limit or max(1, context - frame - answer_tokens), context, frame)

    def allowed(self, answer_tokens: int) -> int:
        """The limit for a request that asks for up to `answer_tokens` tokens of answer."""
        return min(self.limit, self.context - self.frame - answer_tokens)

    def fit(self, text: str | None, answer_tokens: int, truncate: str | None = None,
            what: str = QUESTION) -> tuple[str | None, dict | None]:
        """(the text to use, {"kept_tokens", "dropped_characters"} when it was cut, else None), or a 400."""
        limit = self.allowed(answer_tokens)
        if limit < 1:
            raise ApiError(400, f"max_tokens {answer_tokens} leaves no room for a question in the model's "
                           f"{self.context}-token context", "context_length_exceeded")
        if not text:
            return text, None
        longest = limit * self.MAX_CHARS_PER_TOKEN
        if truncate != "left" and len(text) > longest:
            raise self._too_long(what, f"{len(text)} characters long, more than any text of {limit} tokens is (at "
                                 f"most {self.MAX_CHARS_PER_TOKEN} characters a token)", limit)
        kept = text if len(text) <= longest else text[-longest:].lstrip()
        while len(offsets := self._offsets(kept)) > limit:
            if truncate != "left":
                raise self._too_long(what, f"{len(offsets)} tokens long", limit)
            kept = kept[max(1, offsets[len(offsets) - limit][0]):].lstrip()  # as if the client had sent the tail
        if len(kept) == len(text):
            return text, None
        return kept, {"kept_tokens": len(offsets), "dropped_characters": len(text) - len(kept)}

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            return self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    @staticmethod
    def _too_long(what: str, measured: str, limit: int) -> ApiError:
        cut = f', or send "truncate_prompt": "left" to keep its last {limit} tokens' if what == QUESTION else ""
        return ApiError(400, f"{what} is {measured}; this server accepts at most {limit} tokens (--max-prompt-tokens, "
                        f"and the model's context after the audio and max_tokens). Shorten it{cut}",
                        "context_length_exceeded")


def prompt_frame(recognizer) -> int:
    """Tokens of the chat prompt besides the question: the template and system prompt, the audio queries
    of the longest clip the recognizer reads, and room for a transcript when the model reads one."""
    import numpy as np

    from .audio import SAMPLE_RATE

    processor = recognizer.processor
    longest = np.zeros(int((recognizer.max_seconds or 30.0) * SAMPLE_RATE), dtype=np.float32)
    queries = processor.num_queries(processor.extract_features(longest).shape[-1])
    probe = "?"

    def count(text: str) -> int:
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt = count(processor.render_prompt(processor.messages(probe), queries))
    transcript = processor.max_transcript_tokens if recognizer.use_transcript and processor.transcript_in_prompt else 0
    return prompt - count(probe) + transcript
