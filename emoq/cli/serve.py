"""`emoq serve --model DIR`: the OpenAI-compatible HTTP API of `emoq.serve` in front of a trained model."""

from __future__ import annotations

import argparse

from ..serve import DEFAULT_MAX_UPLOAD_BYTES
from ..serve import __doc__ as SERVE_DOC


def run_serve(args) -> int:
    if args.max_upload_mb <= 0:
        raise SystemExit("emoq serve: --max-upload-mb must be positive")
    import uvicorn

    from ..inference import EmotionRecognizer
    from ..serve import create_app

    try:
        recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device)
    except FileNotFoundError as err:
        raise SystemExit(f"emoq serve: {err}") from None
    app = create_app(recognizer, args.model_name, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"emoq serve: model '{args.model_name}' ({len(recognizer.labels)} labels, {recognizer.device}) "
          f"on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve a trained model over an OpenAI-compatible HTTP API",
        description=SERVE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final', its weights/, or an export)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
                   help="largest request body accepted, in MiB (default 25); larger ones get a 413")
    p.add_argument("--model-name", default="emoq", help="the name clients pass as 'model' (default emoq)")
    p.set_defaults(func=run_serve)
    return p
