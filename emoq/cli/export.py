"""`emoq export --model DIR --out DIR [--merge-lora]`: a trained model as a self-contained Hugging Face folder."""

from __future__ import annotations

import argparse

from ..export import __doc__ as EXPORT_DOC


def run_export(args) -> int:
    from ..export import export_model

    out = export_model(args.model, args.out, merge=args.merge_lora, metrics_path=args.metrics, force=args.force)
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    print(f"exported {args.model} -> {out}{' (LoRA merged)' if args.merge_lora else ''}: {', '.join(files)}")
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "export", help="write a self-contained Hugging Face folder with a model card (optionally LoRA merged)",
        description=EXPORT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final' or its weights/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge-lora", action="store_true", help="fold the LoRA weights into the LLM (no LoRA layers)")
    p.add_argument("--metrics", default=None, help="metrics.json written by emoq eval (or its folder) for the card")
    p.add_argument("--force", action="store_true", help="replace an existing, non-empty --out folder")
    p.set_defaults(func=run_export)
    return p
