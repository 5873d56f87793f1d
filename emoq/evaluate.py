"""`emoq eval`: batch evaluation with every input row accounted for, and the protocol written down.

Writes into --out:
  predictions.jsonl     one line per input row (errors included): key, gold, pred, scores, status, error
  metrics.json          WA/UA/weighted F1/macro F1/per-class/confusion + ok/error counts + protocol
  confusion_matrix.png  row-normalised confusion matrix
  report.md             a readable summary
Rows whose audio cannot be loaded are reported with status "error" and excluded from the metrics;
the count is printed next to the headline. `--mode generate` maps free text onto the label set
through aliases and counts unmappable answers (they score as wrong, never dropped).

Under `accelerate launch` / `torchrun` with N processes, rank r scores rows r, r+N, r+2N, ... on its
own device; the records are gathered on rank 0, which alone writes the outputs, rows in input order
(on CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m emoq.cli eval ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

log = logging.getLogger("emoq.eval")

UNMAPPED = "<unmapped>"  # the prediction of a generated answer that names no label of the set


def read_rows(args):
    """Every row of the chosen dataset split, in file order (no filtering)."""
    if args.manifest:
        from .data.manifest import read_manifest

        return read_manifest(args.manifest, label_set=args.label_set), f"manifest:{args.manifest}"
    if args.dataset == "meld":
        from .data.meld import read_meld

        return read_meld(args.root, args.split, label_set=args.label_set or "meld7"), f"meld:{args.split}"
    from .data.iemocap import read_iemocap

    rows = read_iemocap(args.root, protocol=args.label_set or "iemocap4")
    return [u for u in rows if u.split == f"Session{args.fold}"], f"iemocap:Session{args.fold}"


def evaluate_rows(recognizer, rows, mode: str = "score", batch_size: int = 8, label_set=None) -> list[dict]:
    """One prediction record per row; decoding errors become status=error rows."""
    from .audio import AudioError

    records, ok_idx, clips = [], [], []
    for u in rows:
        rec = {"key": u.key, "gold": u.label, "pred": None, "scores": None, "answer": None,
               "status": "ok", "error": None}
        if u.extra.get("status") == "error" or u.audio is None:
            rec.update(status="error", error=u.extra.get("error") or "no audio")
        else:
            try:
                clips.append(recognizer.load(u.audio))
                ok_idx.append(len(records))
            except AudioError as err:
                rec.update(status="error", error=str(err))
        records.append(rec)
    texts = [rows[i].text for i in ok_idx] if recognizer.use_transcript else None
    if mode == "score":
        for i, res in zip(ok_idx, recognizer.classify_batch(clips, texts, batch_size=batch_size)):
            records[i].update(pred=res["label"], scores=res["scores"])
    else:
        question = recognizer.processor.default_question()
        order = sorted(range(len(clips)), key=lambda j: len(clips[j]))
        for start in range(0, len(order), batch_size):
            part = order[start : start + batch_size]
            answers = recognizer.chat_batch([clips[j] for j in part], [question] * len(part),
                                            [texts[j] for j in part] if texts else None, max_new_tokens=16)
            for j, answer in zip(part, answers):
                records[ok_idx[j]].update(answer=answer, pred=map_answer(answer, label_set))
    return records


def map_answer(answer: str | None, label_set) -> str:
    """A generated answer as a label of `label_set` (through its aliases), or UNMAPPED."""
    mapped = label_set.parse_free_text(answer) if label_set is not None else None
    return mapped or UNMAPPED


def distributed_state(device: str | None):
    """accelerate's PartialState when launched with several processes (accelerate launch, torchrun,
    mpirun), else None: a single process never touches torch.distributed. Ranks use gloo on the CPU
    (no CUDA, ACCELERATE_USE_CPU=true or --device cpu), the accelerator's default backend otherwise."""
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    if get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) <= 1:
        return None
    import torch
    from accelerate import PartialState

    cpu = (parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
           or (device is not None and torch.device(device).type == "cpu"))
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))


def rank_device(state, device: str | None):
    """This rank's device: --device if it names one exactly (e.g. cpu, cuda:1), else the rank's own."""
    import torch

    if state is None or (device is not None and (torch.device(device).type == "cpu" or ":" in device)):
        return device
    return "cpu" if state.device.type == "cpu" else str(state.device)


def evaluate_sharded(recognizer, rows, state, mode: str, batch_size: int, label_set) -> list[dict]:
    """Rank r scores rows r, r+N, ...; every rank gets all records back, in input order."""
    if state is None or state.num_processes == 1:
        return evaluate_rows(recognizer, rows, mode, batch_size, label_set)
    from accelerate.utils import gather_object

    mine = list(range(state.process_index, len(rows), state.num_processes))
    records = evaluate_rows(recognizer, [rows[i] for i in mine], mode, batch_size, label_set)
    gathered = gather_object(list(zip(mine, records)))
    by_index = dict(gathered)
    if len(gathered) != len(rows) or sorted(by_index) != list(range(len(rows))):
        raise RuntimeError(f"emoq eval: gathered {len(gathered)} records for {len(rows)} rows")
    return [by_index[i] for i in range(len(rows))]


def summarise(records, labels, protocol: dict) -> dict:
    from .metrics import METRIC_DEFINITIONS, compute_metrics

    scored = [r for r in records if r["status"] == "ok" and r["gold"] is not None]
    metrics = compute_metrics([r["gold"] for r in scored], [r["pred"] for r in scored], labels) if scored else {}
    metrics.update(
        rows_total=len(records),
        rows_ok=len(scored),
        rows_error=sum(r["status"] == "error" for r in records),
        rows_unlabeled=sum(r["status"] == "ok" and r["gold"] is None for r in records),
        unmapped_answers=sum(r["pred"] == "<unmapped>" for r in records),
        metric_definitions=METRIC_DEFINITIONS,
        protocol=protocol,
    )
    return metrics


def write_outputs(out: Path, records, metrics, labels) -> None:
    from .metrics import format_metrics_table, plot_confusion_matrix

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics.get("labels", labels), out / "confusion_matrix.png")
    p = metrics["protocol"]
    errors = [r for r in records if r["status"] == "error"]
    report = [
        f"# Evaluation: {p['dataset']} ({p['split']})",
        "",
        f"Model: `{p['model']}` · mode: {p['mode']} · classes (in order): {', '.join(labels)}",
        "",
        f"**Weighted F1 {metrics.get('weighted_f1', float('nan')):.4f}** on {metrics['rows_ok']} of "
        f"{metrics['rows_total']} rows ({metrics['rows_error']} could not be loaded and are listed below).",
        "",
        format_metrics_table(metrics) if metrics.get("per_class") else "(nothing could be scored)",
        "",
        "![confusion matrix](confusion_matrix.png)",
        "",
        f"## Rows that could not be scored ({len(errors)})",
        *[f"- `{r['key']}`: {r['error']}" for r in errors],
    ]
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")


def run_eval(args) -> int:
    import torch
    import transformers
    import yaml

    from . import __version__
    from .inference import EmotionRecognizer
    from .labels import get_label_set

    state = distributed_state(args.device)
    num_processes = state.num_processes if state is not None else 1
    is_main = state is None or state.is_main_process
    recognizer = EmotionRecognizer.from_pretrained(args.model, device=rank_device(state, args.device))
    if args.mode == "generate" and not recognizer.can_chat:
        sys.exit(f"emoq eval: {args.model}: {recognizer.no_chat_message()}")
    labels = recognizer.labels  # the trained order (id2label in the saved config), never re-derived
    if args.label_set is None:
        args.label_set = {"meld": "meld7", "iemocap": "iemocap4"}.get(args.dataset) if not args.manifest else None
    rows, source = read_rows(args)
    records = evaluate_sharded(recognizer, rows, state, args.mode, args.batch_size,
                               get_label_set(args.label_set or "meld7"))
    from .inference import weights_folder

    run_config = weights_folder(args.model) / "run_config.yaml"
    trained_with = yaml.safe_load(run_config.read_text(encoding="utf-8")) if run_config.is_file() else {}
    protocol = {
        "dataset": source.split(":")[0], "split": source.split(":", 1)[1], "source": source,
        "classes": labels, "mode": args.mode, "model": str(args.model), "num_processes": num_processes,
        "config": str(run_config) if run_config.is_file() else None,
        "seed": trained_with.get("seed"),  # the training run's seed (evaluation itself is deterministic)
        "versions": {"emoq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    metrics = summarise(records, labels, protocol)
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
        "eval", help="evaluate a model on MELD / IEMOCAP / a manifest (every row reported)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="trained model folder (stage-2 'final' or its weights/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["meld", "iemocap"])
    src.add_argument("--manifest", help="JSONL manifest (e.g. written by emoq prepare)")
    p.add_argument("--root", help="corpus root (with --dataset)")
    p.add_argument("--split", default="test", help="MELD split (default test)")
    p.add_argument("--fold", type=int, default=5, help="IEMOCAP held-out session (default 5)")
    p.add_argument("--label-set", default=None, help="label set of the data (default: the dataset's)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", choices=["score", "generate"], default="score")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_eval)
    return p

