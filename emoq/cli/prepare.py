"""`emoq prepare DATASET --root DIR --out DIR` (a `datasets` dataset: `emoq prepare hf --path P --out DIR`): decode
a corpus once to 16 kHz wav + JSONL manifests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.splits import DATASETS
from .options import add_hf_arguments, hf_source, positive_int


def add_parser(subparsers):
    """Register ``emoq prepare`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "prepare",
        help="convert a corpus once to 16 kHz mono wavs + JSONL manifests (resumable, parallel)",
        description="Convert a corpus once into 16 kHz mono wavs + one JSONL manifest per split. Every input "
        "row gets a manifest line (bad media: status 'error' with a message naming the file); re-running "
        "decodes only clips that are new or whose source changed (failed clips stay failed until then), "
        "also after a run that was interrupted or killed: every clip decoded before is kept.",
        epilog="Examples:\n  emoq prepare meld --root MELD.Raw --out data/meld16k --workers 4\n"
        "  emoq prepare iemocap --root IEMOCAP_full_release --out data/iemocap16k\n"
        "  emoq prepare manifest --root corpus.jsonl --out data/corpus16k\n"
        "  emoq prepare hf --path demo_out/corpus_hf --out data/demo16k --split test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dataset", choices=DATASETS, help="corpus layout to read")
    p.add_argument("--root", type=Path, help="corpus folder (manifest: a .jsonl file or a folder of them; hf: use --path)")
    p.add_argument("--out", required=True, type=Path, help="output folder for wav/ and <split>.jsonl")
    p.add_argument("--split", action="append", dest="splits", metavar="NAME",
                   help="only this split (repeatable): train/dev/test, Session1..Session5, a manifest stem, or a "
                   "`datasets` split name")
    p.add_argument("--workers", type=positive_int, default=2, help="decoding processes (default 2)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="truncate longer clips (listed in the summary); default keeps everything")
    p.add_argument("--min-seconds", type=float, default=0.1, help="shorter clips are error rows (default 0.1)")
    p.add_argument("--protocol", default="iemocap4", choices=("iemocap4", "iemocap_patamia4"),
                   help="IEMOCAP protocol (default iemocap4: happy+excited merged, leave-one-session-out)")
    p.add_argument("--label-set", default=None,
                   help="MELD: meld7 (default) or meld_sentiment3; manifest: normalise labels through this set")
    p.add_argument("--overwrite", action="store_true", help="decode every clip again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_hf_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``args.func`` of ``emoq prepare``: exit code 0 when at least one clip converted."""
    from ..data.prepare import prepare
    from ..data.records import DatasetError

    if args.dataset == "hf":
        hf = hf_source(args, "prepare")
        root = hf.pop("path")
    elif args.root is None:
        raise SystemExit(f"emoq prepare: {args.dataset} needs --root (the corpus folder or manifest)")
    else:
        hf, root = None, args.root
    try:
        report = prepare(
            args.dataset, root, args.out, splits=args.splits, workers=args.workers,
            max_seconds=args.max_seconds, min_seconds=args.min_seconds, label_set=args.label_set,
            protocol=args.protocol, overwrite=args.overwrite, progress=False if args.no_progress else None, hf=hf,
        )
    except (DatasetError, ValueError, KeyError) as exc:
        print(f"emoq prepare: error: {exc}", file=sys.stderr)
        return 2
    if report.exit_code:
        print("emoq prepare: no clip could be converted", file=sys.stderr)
    return report.exit_code
