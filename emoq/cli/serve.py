"""`emoq serve --model DIR`: the OpenAI-compatible HTTP API of `emoq.serve` in front of a trained model."""

from __future__ import annotations

import argparse
import os
import signal

from ..serve import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_SHUTDOWN_TIMEOUT
from ..serve import __doc__ as SERVE_DOC
from ..serve_limits import (
    DEFAULT_MAX_CONCURRENT_UPLOADS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_REQUEST_TIMEOUT,
    is_loopback,
)

API_KEY_ENV = "EMOQ_API_KEY"


def run_serve(args) -> int:
    for option in ("max_upload_mb", "max_concurrent_uploads", "max_queue", "request_timeout", "shutdown_timeout"):
        if getattr(args, option) <= 0:
            raise SystemExit(f"emoq serve: --{option.replace('_', '-')} must be positive")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise SystemExit("emoq serve: --max-prompt-tokens must be at least 1")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not is_loopback(args.host):
        raise SystemExit(f"emoq serve: refusing to listen on {args.host} without an API key (anyone who can reach "
                         f"it could use the model): set --api-key or {API_KEY_ENV}, or listen on 127.0.0.1")

    from ..inference import EmotionRecognizer, weights_folder
    from ..serve import create_app

    folder = weights_folder(args.model)  # a missing folder, a foreign or broken config.json: one line (cli.main)
    try:
        recognizer = EmotionRecognizer.from_pretrained(folder, device=args.device)
    except Exception as err:  # weights the model classes reject: one line, not transformers' traceback
        if os.environ.get("EMOQ_DEBUG"):
            raise
        problem = (str(err).strip().splitlines() or [""])[0]
        raise SystemExit(f"emoq serve: error: cannot load the model in {folder}: {type(err).__name__}: {problem}") from None
    app = create_app(recognizer, args.model_name, max_upload_bytes=int(args.max_upload_mb * 2**20), api_key=api_key,
                     max_concurrent_uploads=args.max_concurrent_uploads, max_prompt_tokens=args.max_prompt_tokens,
                     max_queue=args.max_queue, request_timeout=args.request_timeout)
    budget = f", questions up to {app.state.budget.limit} tokens" if app.state.budget else ""
    print(f"emoq serve: model '{args.model_name}' ({len(recognizer.labels)} labels, {recognizer.device}{budget}) "
          f"on http://{args.host}:{args.port}{'' if api_key else ' (no API key)'}", flush=True)
    serve_until_stopped(app, args.host, args.port, args.shutdown_timeout)
    return 0


def serve_until_stopped(app, host: str, port: int, shutdown_timeout: float) -> None:
    """uvicorn until SIGTERM or Ctrl-C. Then it stops accepting connections and gives requests in flight
    `shutdown_timeout` s to finish; at that deadline the app's model queue is closed, so what is left
    answers a 503 (a stream: an error event) within one decoding step, and uvicorn's own cancellation
    (which logs a traceback per request) stays a backstop that is not reached.

    uvicorn re-raises the signal once it is done, so that the signal's default action ends the process
    (killed by SIGTERM: status 143); a handler that does nothing turns the finished graceful shutdown into
    a plain exit 0, and a caught KeyboardInterrupt does the same for Ctrl-C.
    """
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            asyncio.get_running_loop().call_later(shutdown_timeout, app.state.worker.close)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=int(shutdown_timeout) + 10)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        Server(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve a trained model over an OpenAI-compatible HTTP API",
        description=SERVE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final', its weights/, or an export)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another address, such as "
                        "0.0.0.0, needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--model-name", default="emoq", help="the name clients pass as 'model' (default emoq)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: the "
                        f"{API_KEY_ENV} environment variable, which keeps the key out of the process list)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                   help="largest request body accepted, in MiB (default 25); larger ones get a 413")
    p.add_argument("--max-concurrent-uploads", type=int, default=DEFAULT_MAX_CONCURRENT_UPLOADS,
                   help=f"request bodies held in memory at once add up to at most this many times "
                        f"--max-upload-mb (default {DEFAULT_MAX_CONCURRENT_UPLOADS}); beyond: 503 with Retry-After")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="tokens the question (the last user message's text), or the transcript sent to "
                        "/v1/audio/emotion, may have (default: the LLM's context "
                        "length minus the audio and prompt frame and the largest max_tokens); longer: 400, or cut "
                        "from the left when the request sends \"truncate_prompt\": \"left\"")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"model calls admitted at once, waiting or running (default {DEFAULT_MAX_QUEUE}); "
                        "beyond: 503 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                   help=f"seconds a request may wait for its turn on the model (default {DEFAULT_REQUEST_TIMEOUT:g}); "
                        "past it: 503 with Retry-After, without running the model")
    p.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                   help=f"on SIGTERM or Ctrl-C, seconds requests in flight get to finish before they are "
                        f"cancelled (default {DEFAULT_SHUTDOWN_TIMEOUT:g})")
    p.set_defaults(func=run_serve)
    return p
