"""`emoq predict`: classify audio files (or a manifest's rows) into a JSONL file, every input accounted for.

One JSON line per input, in input order:
  {"input": ..., "label": ..., "scores": {label: probability}, "transcript": ..., "transcript_source": ...,
   "status": "ok" | "error", "error": ...}
Manifest rows also carry their "key" and "gold" label. An input that cannot be loaded (missing,
empty, not audio...) becomes a status "error" row whose message names the file; it is never dropped.
Labels and scores are those of `EmotionRecognizer.classify` (label scoring, no free generation).

Transcripts are read when the model was trained with them (`use_transcript`): the input's own
(`--text-file`, or a manifest's "text"; source "gold") where it has one, else what the ASR model hears
(source "asr"; the run config's model.asr, default builtin:whisper-tiny.en, or --asr; --asr none: no
ASR, source "none"). A model trained without transcripts reads none ("none").
Exit status 0 when at least one input was predicted, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_from_paths(paths: list[str], text_file: str | None = None):
    from ..evaluation.runner import Row

    texts: list[str | None] = [None] * len(paths)
    if text_file is not None:
        lines = Path(text_file).read_text(encoding="utf-8").splitlines()
        if len(lines) != len(paths):
            raise SystemExit(f"emoq predict: {text_file} has {len(lines)} lines but {len(paths)} audio inputs "
                             "were given (one transcript line per input, empty line = none)")
        texts = [line.strip() or None for line in lines]
    return [Row(input=p, audio=p, text=t) for p, t in zip(paths, texts)]


def rows_from_manifest(path: str, label_set: str | None = None):
    from ..data.manifest import read_manifest
    from ..data.records import DatasetError
    from ..evaluation.runner import Row

    try:
        return [Row.from_utterance(u) for u in read_manifest(path, label_set=label_set)]
    except DatasetError as err:
        raise SystemExit(f"emoq predict: {err}") from None


def run_predict(args) -> int:
    if args.manifest and args.audio:
        raise SystemExit("emoq predict: give AUDIO files or --manifest, not both")
    if not args.manifest and not args.audio:
        raise SystemExit("emoq predict: nothing to classify (give AUDIO files or --manifest)")
    if args.manifest and args.text_file:
        raise SystemExit("emoq predict: --text-file goes with AUDIO files; a manifest carries its own 'text'")
    if args.batch_size < 1:
        raise SystemExit("emoq predict: --batch-size must be at least 1")
    rows = rows_from_manifest(args.manifest, args.label_set) if args.manifest else rows_from_paths(args.audio,
                                                                                                   args.text_file)
    from ..evaluation.report import predict_record
    from ..evaluation.runner import score_rows
    from ..inference import EmotionRecognizer

    asr = {"asr": args.asr} if args.asr is not None else {}
    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device, **asr)
    if args.text_file and not recognizer.use_transcript:
        print("emoq predict: this model was trained without transcripts; --text-file is ignored", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_ok = n_err = 0
    with open(out, "w", encoding="utf-8") as f:
        for result in score_rows(recognizer, rows, batch_size=args.batch_size):
            f.write(json.dumps(predict_record(result), ensure_ascii=False) + "\n")
            f.flush()
            n_ok += result.status == "ok"
            n_err += result.status == "error"
    print(f"predicted {n_ok}/{len(rows)} inputs ({n_err} errors) -> {out}")
    return 0 if n_ok else 1


def add_parser(subparsers):
    p = subparsers.add_parser(
        "predict", help="classify audio files or a manifest into a JSONL file (one row per input)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("audio", nargs="*", metavar="AUDIO", help="audio files (any format load_audio reads)")
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final', its weights/, or an export)")
    p.add_argument("--manifest", help="JSONL manifest instead of AUDIO files (e.g. written by emoq prepare)")
    p.add_argument("--label-set", default=None, help="normalise the manifest's gold labels through this label set")
    p.add_argument("--text-file", default=None,
                   help="transcripts for the AUDIO files, one line per file in the same order (empty line = none)")
    p.add_argument("--asr", default=None, metavar="REF",
                   help="ASR model for inputs without a transcript (builtin:*, hub id or folder; default: the "
                   "run config's model.asr; none: no ASR)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_predict)
    return p
