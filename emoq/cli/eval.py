"""`emoq eval`: batch evaluation with every input row accounted for, and the protocol written down.

Writes into --out:
  predictions.jsonl     one line per input row (errors included): key, gold, pred, scores, answer,
                        transcript, transcript_source, status, error
  metrics.json          WA/UA/weighted F1/macro F1/per-class/confusion + ok/error counts + protocol
  confusion_matrix.png  row-normalised confusion matrix
  report.md             a readable summary
Rows whose audio cannot be loaded are reported with status "error" and excluded from the metrics;
the count is printed next to the headline. `--mode generate` maps free text onto the label set
through aliases and counts unmappable answers (they score as wrong, never dropped).

--transcripts (for a model trained with transcripts; a model without them always runs with none):
  gold  the corpus transcripts (default); a row without one goes without
  asr   the corpus transcripts are ignored: every clip is transcribed by the model's ASR model
        (the run config's model.asr, default builtin:whisper-tiny.en; --asr names another)
  none  no transcripts at all
The choice is stamped into metrics.json's protocol ("transcripts", "asr_model") and each row of
predictions.jsonl carries the transcript it was scored with and its source (gold, asr, none).

Under `accelerate launch` / `torchrun` with N processes, rank r scores rows r, r+N, r+2N, ... on its
own device; the records are gathered on rank 0, which alone writes the outputs, rows in input order
(on CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m emoq.cli eval ...`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.splits import DATASETS
from ..evaluation.runner import MODES, TRANSCRIPT_MODES
from .options import add_hf_arguments, hf_source, positive_int


def run_eval(args) -> int:
    import yaml

    from ..data.splits import DEFAULT_LABEL_SETS, read_split, split_source
    from ..evaluation.report import eval_record, protocol, summarise, write_outputs
    from ..evaluation.runner import Row, distributed_state, rank_device, score_rows_sharded
    from ..inference import EmotionRecognizer, weights_folder
    from ..labels import get_label_set

    dataset = "manifest" if args.manifest else args.dataset
    hf = hf_source(args, "eval") if dataset == "hf" else None
    if dataset in ("meld", "iemocap") and not args.root:
        raise SystemExit(f"emoq eval: --dataset {dataset} needs --root (the corpus folder)")
    run_config = weights_folder(args.model) / "run_config.yaml"
    trained_with = yaml.safe_load(run_config.read_text(encoding="utf-8")) if run_config.is_file() else {}
    # IEMOCAP's dev part is carved out of the training sessions: the same fraction as in training
    dev_fraction = (trained_with.get("data") or {}).get("dev_fraction", 0.1)
    # the data is read before the model loads: a wrong folder or split fails in a second, not after loading
    rows = read_split(dataset, args.split, root=args.root, manifest=args.manifest, label_set=args.label_set,
                      fold=args.fold, dev_fraction=dev_fraction, hf=hf)
    state = distributed_state(args.device)
    is_main = state is None or state.is_main_process
    asr = {"asr": args.asr} if args.asr is not None else {}
    recognizer = EmotionRecognizer.from_pretrained(args.model, device=rank_device(state, args.device), **asr)
    if args.mode == "generate" and not recognizer.can_chat:
        sys.exit(f"emoq eval: {args.model}: {recognizer.no_chat_message()}")
    transcripts = args.transcripts
    if not recognizer.use_transcript and transcripts != "none":
        if is_main:
            print(f"emoq eval: this model was trained without transcripts; --transcripts {transcripts} "
                  "becomes none", file=sys.stderr)
        transcripts = "none"
    if transcripts == "asr" and not recognizer.can_transcribe:
        sys.exit(f"emoq eval: --transcripts asr: {args.model} has no ASR model (its run config says "
                 "model.asr: null, or it has no run_config.yaml); name one with --asr, e.g. "
                 "--asr builtin:whisper-tiny.en")
    labels = recognizer.labels  # the trained order (id2label in the saved config), never re-derived
    label_set = get_label_set(args.label_set or DEFAULT_LABEL_SETS.get(dataset, "meld7"))
    results = score_rows_sharded(recognizer, [Row.from_utterance(u) for u in rows], state, mode=args.mode,
                                 batch_size=args.batch_size, label_set=label_set, transcripts=transcripts)
    records = [eval_record(r) for r in results]
    metrics = summarise(records, labels, protocol(
        source=split_source(dataset, args.split, manifest=args.manifest, fold=args.fold, path=args.path),
        labels=labels,
        mode=args.mode, model=str(args.model), num_processes=state.num_processes if state is not None else 1,
        run_config=run_config if run_config.is_file() else None, seed=trained_with.get("seed"),
        transcripts=transcripts, asr_model=recognizer.asr,
    ))
    if state is not None:
        state.destroy_process_group()  # every rank holds every record now; no more collectives
    if not is_main:
        return 0 if metrics["rows_ok"] else 1
    out = Path(args.out)
    write_outputs(out, records, metrics, labels)
    headline = metrics.get("weighted_f1")
    print(f"weighted F1 = {headline:.4f}  accuracy = {metrics['accuracy']:.4f}  (scored {metrics['rows_ok']}/"
          f"{metrics['rows_total']} rows, {metrics['rows_error']} errors)" if headline is not None
          else f"nothing could be scored ({metrics['rows_error']} errors)")
    print(f"wrote {out}/predictions.jsonl, metrics.json, confusion_matrix.png, report.md")
    return 0 if metrics["rows_ok"] else 1


def add_parser(subparsers):
    p = subparsers.add_parser(
        "eval", help="evaluate a model on MELD / IEMOCAP / a `datasets` dataset / a manifest (every row reported)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final' or its weights/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=[d for d in DATASETS if d != "manifest"])
    src.add_argument("--manifest", help="JSONL manifest (e.g. written by emoq prepare)")
    p.add_argument("--root", help="corpus root (with --dataset meld / iemocap)")
    p.add_argument("--split", default="test", help="split: train, dev or test (default test; IEMOCAP test = --fold; "
                   "hf: the dataset's own split name)")
    p.add_argument("--fold", type=int, default=5, help="IEMOCAP held-out session (default 5)")
    p.add_argument("--label-set", default=None, help="label set of the data (default: the dataset's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--mode", choices=MODES, default="score",
                   help="score: label scoring under the LLM (default); head: the classification head (an EmoQ "
                   "stage-1 model, or to compare with the LLM's scores); generate: free answers mapped to labels")
    p.add_argument("--transcripts", choices=TRANSCRIPT_MODES, default=TRANSCRIPT_MODES[0],
                   help="transcripts the model reads: the corpus's (gold, default), Whisper's for every clip "
                   "(asr) or none")
    p.add_argument("--asr", default=None, metavar="REF",
                   help="ASR model for --transcripts asr (builtin:*, hub id or folder; default: the run "
                   "config's model.asr; none: no ASR)")
    p.add_argument("--device", default=None)
    add_hf_arguments(p)
    p.set_defaults(func=run_eval)
    return p
