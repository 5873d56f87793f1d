"""`emoq predict`: classify audio files (or a manifest's or a `datasets` split's rows) into a JSONL file, every
input accounted for.

One JSON line per input, in input order:
  {"input": ..., "label": ..., "scores": {label: probability}, "transcript": ..., "transcript_source": ...,
   "status": "ok" | "error", "error": ..., "truncated_to": ...}
Manifest and dataset rows (--dataset hf --path ... --split ...) also carry their "key" and "gold" label. An input that cannot be loaded (missing,
empty, not audio...) becomes a status "error" row whose message names the file; it is never dropped.
Labels and scores are those of `EmotionRecognizer.classify` (label scoring, no free generation). A clip
longer than the model takes (30 s) is scored on its first 30 s, and its row says so: "truncated_to": 30.0
(null for a clip scored whole).

--out appears only once every row is written: until then a file already there stays as it was (an
interrupted run never costs an earlier result). Rows are written as they come to .NAME.partial beside it;
--resume keeps the rows already written, in --out or in that file, for the same inputs in the same order
(same input, key and gold label), and predicts only the rest.

Transcripts are read when the model was trained with them (`use_transcript`): the input's own
(`--text-file`, or a manifest's "text"; source "gold") where it has one, else what the ASR model hears
(source "asr"; the run config's model.asr, default builtin:whisper-tiny.en, or --asr; --asr none: no
ASR, source "none"). A model trained without transcripts reads none ("none").
Exit status 0 when at least one input was predicted, else 1.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
from pathlib import Path

from ..files import append_line_durably, atomic_open, atomic_write_text
from .options import add_hf_arguments, hf_source, positive_int


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


def rows_from_dataset(args):
    """The rows of one split of a `datasets` dataset (--dataset hf --path ... --split ...)."""
    from ..data.splits import read_split
    from ..evaluation.runner import Row

    return [Row.from_utterance(u) for u in read_split("hf", args.split, label_set=args.label_set or "meld7",
                                                      hf=hf_source(args, "predict"))]


def run_predict(args) -> int:
    sources = [name for name, given in (("AUDIO files", args.audio), ("--manifest", args.manifest),
                                        ("--dataset", args.dataset)) if given]
    if len(sources) > 1:
        raise SystemExit(f"emoq predict: give one of AUDIO files, --manifest or --dataset, not {' and '.join(sources)}")
    if not sources:
        raise SystemExit("emoq predict: nothing to classify (give AUDIO files, --manifest or --dataset hf --path)")
    if args.text_file and not args.audio:
        raise SystemExit("emoq predict: --text-file goes with AUDIO files; a manifest or dataset carries its own text")
    if args.dataset:
        rows = rows_from_dataset(args)
    elif args.manifest:
        rows = rows_from_manifest(args.manifest, args.label_set)
    else:
        rows = rows_from_paths(args.audio, args.text_file)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(out)
    partial = _partial_path(out)
    kept = _kept_lines(rows, [out, partial]) if args.resume else []
    statuses = [json.loads(line)["status"] for line in kept]
    if args.resume:
        print(f"resuming {out}: kept {len(kept)} rows already predicted for these inputs, "
              f"{len(rows) - len(kept)} to go")
    if args.resume and len(kept) == len(rows):
        print("nothing left to predict")
        if _read_bytes(out) != "".join(kept).encode("utf-8"):
            atomic_write_text(out, "".join(kept))
        partial.unlink(missing_ok=True)
    else:
        statuses += _predict_into(partial, kept, rows[len(kept):], args)
        _publish(partial, out)
    n_ok, n_err = statuses.count("ok"), statuses.count("error")
    print(f"predicted {n_ok}/{len(rows)} inputs ({n_err} errors) -> {out}")
    return 0 if n_ok else 1


def _predict_into(partial: Path, kept: list[str], rows, args) -> list[str]:
    """Write `kept`, then a row per prediction for `rows` as each comes, to `partial`; -> their statuses."""
    from ..evaluation.report import predict_record
    from ..evaluation.runner import score_rows

    recognizer = _recognizer(args)
    atomic_write_text(partial, "".join(kept))  # whole lines only: the rows that follow start a line
    statuses = []
    with open(partial, "a", encoding="utf-8", newline="\n") as f:
        for result in score_rows(recognizer, rows, batch_size=args.batch_size):
            append_line_durably(f, json.dumps(predict_record(result), ensure_ascii=False) + "\n")
            statuses.append(result.status)
    return statuses


def _recognizer(args):
    from ..inference import EmotionRecognizer

    asr = {"asr": args.asr} if args.asr is not None else {}
    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device, **asr)
    if args.text_file and not recognizer.use_transcript:
        print("emoq predict: this model was trained without transcripts; --text-file is ignored", file=sys.stderr)
    return recognizer


def _partial_path(out: Path) -> Path:
    """Where the rows of a run go until it has written them all (and what --resume continues from)."""
    return out.with_name(f".{out.name}.partial")


def _kept_lines(rows, paths) -> list[str]:
    """What --resume keeps: the longest run of whole lines, in one of `paths` (the output of a finished run,
    the partial file of an interrupted one), that answers `rows` from the first on, in order."""
    best: list[str] = []
    for path in paths:
        lines = []
        for line, row in zip(_whole_lines(path), rows):
            if not _answers(line, row):
                break
            lines.append(line)
        if len(lines) > len(best):
            best = lines
    return best


def _whole_lines(path: Path) -> list[str]:
    """The lines of `path` that end with a newline: a last line cut short by a kill is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [line + "\n" for line in text.split("\n")[:-1]]


def _answers(line: str, row) -> bool:
    """Whether an output line is the prediction for `row`: the same input, key and gold label."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return (isinstance(record, dict) and record.get("status") in ("ok", "error") and record.get("input") == row.input
            and record.get("key") == row.key and record.get("gold") == row.gold)



def _publish(partial: Path, out: Path) -> None:
    """Put the finished rows at `out` in one step (until then `out` holds the earlier result, whole), then
    drop the partial file."""
    with open(partial, "rb") as src, atomic_open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.unlink(missing_ok=True)


def _remove_stale_temp_files(out: Path) -> None:
    """Remove the temp files (`.NAME.PID.HEX.tmp`) a run killed while putting its rows at `out` left beside
    it: those of a process that is gone."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp", path.name)
        if match and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


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
    p.add_argument("--out", required=True,
                   help="output JSONL file (written when every row is done; an earlier one stays until then)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already written for the same inputs in the same order (by a finished or "
                   "an interrupted run) and predict only the rest")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", choices=("hf",), help="classify a split of a `datasets` dataset (with --path)")
    p.add_argument("--split", default="test", help="with --dataset: the dataset's split (default test)")
    add_hf_arguments(p)
    p.set_defaults(func=run_predict)
    return p
