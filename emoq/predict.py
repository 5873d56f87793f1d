"""`emoq predict`: classify audio files (or a manifest's rows) into a JSONL file, every input accounted for.

One JSON line per input, in input order:
  {"input": ..., "label": ..., "scores": {label: probability}, "status": "ok" | "error", "error": ...}
Manifest rows also carry their "key" and "gold" label. An input that cannot be loaded (missing,
empty, not audio...) becomes a status "error" row whose message names the file; it is never dropped.
Labels and scores are those of `EmotionRecognizer.classify` (label scoring, no free generation).
Transcripts (`--text-file`, or a manifest's "text") are used when the model was trained with them
(`use_transcript`), as in `emoq eval`. Exit status 0 when at least one input was predicted, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PredictInput:
    """One thing to classify: what the user named (`input`), where its audio is, optional transcript."""

    input: str
    audio: str | None
    text: str | None = None
    key: str | None = None
    gold: str | None = None
    error: str | None = None  # known before loading (a manifest row whose conversion failed)


def inputs_from_paths(paths: list[str], text_file: str | None = None) -> list[PredictInput]:
    texts: list[str | None] = [None] * len(paths)
    if text_file is not None:
        lines = Path(text_file).read_text(encoding="utf-8").splitlines()
        if len(lines) != len(paths):
            raise SystemExit(f"emoq predict: {text_file} has {len(lines)} lines but {len(paths)} audio inputs "
                             "were given (one transcript line per input, empty line = none)")
        texts = [line.strip() or None for line in lines]
    return [PredictInput(input=p, audio=p, text=t) for p, t in zip(paths, texts)]


def inputs_from_manifest(path: str, label_set: str | None = None) -> list[PredictInput]:
    from .data.manifest import read_manifest
    from .data.records import DatasetError

    try:
        rows = read_manifest(path, label_set=label_set)
    except DatasetError as err:
        raise SystemExit(f"emoq predict: {err}") from None
    out = []
    for u in rows:
        error = None
        if u.extra.get("status") == "error" or u.audio is None:
            error = u.extra.get("error") or f"{u.key}: no audio"
        out.append(PredictInput(input=u.audio if u.audio is not None else u.key, audio=u.audio, text=u.text,
                                key=u.key, gold=u.label, error=error))
    return out


def predict_rows(recognizer, inputs: list[PredictInput], batch_size: int = 8, chunk_size: int | None = None):
    """Yield one record per input, in input order.

    Inputs are loaded and scored a chunk at a time (memory stays bounded on long lists); results do not
    depend on the chunking because `classify_batch` is batch invariant.
    """
    from .audio import AudioError

    chunk_size = chunk_size or max(8 * batch_size, 64)
    use_text = recognizer.use_transcript
    for start in range(0, len(inputs), chunk_size):
        part = inputs[start : start + chunk_size]
        records, ok_idx, clips = [], [], []
        for item in part:
            rec = {"input": item.input}
            if item.key is not None:
                rec.update(key=item.key, gold=item.gold)
            rec.update(label=None, scores=None, status="ok", error=None)
            if item.error is not None:
                rec.update(status="error", error=item.error)
            else:
                try:
                    clips.append(recognizer.load(item.audio))
                    ok_idx.append(len(records))
                except AudioError as err:
                    rec.update(status="error", error=str(err))
            records.append(rec)
        if clips:
            texts = [part[i].text for i in ok_idx] if use_text else None
            for i, res in zip(ok_idx, recognizer.classify_batch(clips, texts, batch_size=batch_size)):
                records[i].update(label=res["label"], scores=res["scores"])
        yield from records


def run_predict(args) -> int:
    if args.manifest and args.audio:
        raise SystemExit("emoq predict: give AUDIO files or --manifest, not both")
    if not args.manifest and not args.audio:
        raise SystemExit("emoq predict: nothing to classify (give AUDIO files or --manifest)")
    if args.manifest and args.text_file:
        raise SystemExit("emoq predict: --text-file goes with AUDIO files; a manifest carries its own 'text'")
    if args.batch_size < 1:
        raise SystemExit("emoq predict: --batch-size must be at least 1")
    inputs = (inputs_from_manifest(args.manifest, args.label_set) if args.manifest
              else inputs_from_paths(args.audio, args.text_file))

    from .inference import EmotionRecognizer

    recognizer = EmotionRecognizer.from_pretrained(args.model, device=args.device)
    if args.text_file and not recognizer.use_transcript:
        print("emoq predict: this model was trained without transcripts; --text-file is ignored", file=sys.stderr)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n_ok = n_err = 0
    with open(out, "w", encoding="utf-8") as f:
        for rec in predict_rows(recognizer, inputs, batch_size=args.batch_size):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            n_ok += rec["status"] == "ok"
            n_err += rec["status"] == "error"
    print(f"predicted {n_ok}/{len(inputs)} inputs ({n_err} errors) -> {out}")
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
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_predict)
    return p
