"""`emoq`: the parser that gathers every subcommand, and the entry point (`emoq.cli.main`).

Each subcommand lives in its own module under `emoq.cli` and exposes `add_parser(subparsers)`; those
modules keep their heavy imports (torch, transformers) inside functions so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import catalog

# subcommand -> module of emoq.cli exposing add_parser(subparsers)
SUBCOMMANDS = {
    "run": "run",
    "prepare": "prepare",
    "eval": "eval",
    "predict": "predict",
    "chat": "chat",
    "export": "export",
    "serve": "serve",
    "demo": "demo",
    "estimate-memory": "estimate_memory",
}

#: subcommands that take trailing `key=value` config overrides (also after their options)
WITH_OVERRIDES = ("run", "estimate-memory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emoq",
        description="emoq: speech emotion recognition with an EmoQ-Former and a LoRA-tuned LLM.",
        epilog="Examples:\n  emoq ls\n  emoq run stage1_qformer --config emoq/demo_cpu trainer.max_steps=2\n"
        "  emoq run stage2_llm --config emoq/demo_cpu --nproc 2 --accelerate-config zero2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    catalog.add_parsers(sub)
    for name, module in SUBCOMMANDS.items():
        try:
            importlib.import_module(f"{__package__}.{module}").add_parser(sub)
        except ImportError as err:  # an optional dependency missing must not break the other commands
            p = sub.add_parser(name, help=f"(unavailable: {err})")
            p.set_defaults(func=lambda args, err=err: sys.exit(f"emoq: {err}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `run RECIPE --config C k=v`, `estimate-memory CONFIG --nproc 8 k=v`: argparse binds the (empty) overrides
    # at the positional argument, so the k=v after an option arrive as unknown arguments; collect them in
    # order, and reject anything that is not k=v
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "command", None) not in WITH_OVERRIDES or any("=" not in a or a.startswith("-")
                                                                         for a in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        if os.environ.get("EMOQ_DEBUG"):
            raise
        print(f"emoq {args.command}: error: {err}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """What bad input raises — a missing or foreign model folder, an unreadable corpus or config, an unknown
    label — shown as one line naming the problem rather than a traceback (EMOQ_DEBUG=1 shows the traceback)."""
    from ..audio import AudioError
    from ..config import ConfigError
    from ..data.records import DatasetError
    from ..inference import ModelFolderError
    from ..labels import UnknownLabelError, UnknownLabelSetError

    return (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, AudioError, ConfigError,
            DatasetError, ModelFolderError, UnknownLabelError, UnknownLabelSetError)


if __name__ == "__main__":
    sys.exit(main())
