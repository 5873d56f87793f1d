"""What an evaluation leaves behind, with the protocol written down next to the numbers.

  predictions.jsonl     one line per input row (errors included): key, gold, pred, scores, answer, transcript,
                        transcript_source ("gold", "asr", "none"; null on error rows), status, error
  metrics.json          WA/UA/weighted F1/macro F1/per-class/confusion + ok/error counts + protocol (which
                        includes the transcripts used: gold, asr (with the ASR model) or none)
  confusion_matrix.png  row-normalised confusion matrix
  report.md             a readable summary, listing every row that could not be scored
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from ..files import atomic_write_text
from ..labels import UNMAPPED
from .metrics import METRIC_DEFINITIONS, compute_metrics, format_metrics_table, plot_confusion_matrix
from .runner import RowResult


def eval_record(result: RowResult) -> dict:
    """A line of `emoq eval`'s predictions.jsonl (`truncated_to`: the seconds a clip longer than the model takes
    was cut to before scoring, None when it was scored whole)."""
    return {"key": result.row.key, "gold": result.row.gold, "pred": result.label, "scores": result.scores,
            "answer": result.answer, "transcript": result.transcript, "transcript_source": result.transcript_source,
            "status": result.status, "error": result.error, "truncated_to": result.truncated_to}


def predict_record(result: RowResult) -> dict:
    """A line of `emoq predict`'s output: the input as named, its key and gold label when it came from a
    manifest or a dataset, the label and its scores, the transcript the model read and its source, and
    `truncated_to` (as in :func:`eval_record`)."""
    record = {"input": result.row.input}
    if result.row.key is not None:
        record.update(key=result.row.key, gold=result.row.gold)
    record.update(label=result.label, scores=result.scores, transcript=result.transcript,
                  transcript_source=result.transcript_source, status=result.status, error=result.error,
                  truncated_to=result.truncated_to)
    return record


def protocol(*, source: str, labels: list[str], mode: str, model: str, num_processes: int,
             run_config: Path | None, seed, transcripts: str = "gold", asr_model: str | None = None) -> dict:
    """How the numbers were made: data, class order, mode, model, transcripts (gold, asr, none; the ASR
    model when asr), training config and seed, versions."""
    import torch
    import transformers

    from .. import __version__

    dataset, _, split = source.partition(":")
    return {
        "dataset": dataset, "split": split, "source": source, "classes": labels, "mode": mode, "model": model,
        "transcripts": transcripts, "asr_model": asr_model if transcripts == "asr" else None,
        "num_processes": num_processes, "config": str(run_config) if run_config is not None else None,
        "seed": seed,  # the training run's seed (evaluation itself is deterministic)
        "versions": {"emoq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def summarise(records: list[dict], labels: list[str], protocol: dict) -> dict:
    """Metrics over the rows that were scored and have a gold label, plus counts of every other row."""
    scored = [r for r in records if r["status"] == "ok" and r["gold"] is not None]
    metrics = compute_metrics([r["gold"] for r in scored], [r["pred"] for r in scored], labels) if scored else {}
    metrics.update(
        rows_total=len(records),
        rows_ok=len(scored),
        rows_error=sum(r["status"] == "error" for r in records),
        rows_unlabeled=sum(r["status"] == "ok" and r["gold"] is None for r in records),
        unmapped_answers=sum(r["pred"] == UNMAPPED for r in records),
        metric_definitions=METRIC_DEFINITIONS,
        protocol=protocol,
    )
    return metrics


def write_outputs(out: Path, records: list[dict], metrics: dict, labels: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False))
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics.get("labels", labels), out / "confusion_matrix.png")
    p = metrics["protocol"]
    errors = [r for r in records if r["status"] == "error"]
    report = [
        f"# Evaluation: {p['dataset']} ({p['split']})",
        "",
        f"Model: `{p['model']}` · mode: {p['mode']} · transcripts: {_transcripts_line(p)} · "
        f"classes (in order): {', '.join(labels)}",
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
    atomic_write_text(out / "report.md", "\n".join(report) + "\n")


def _transcripts_line(p: dict) -> str:
    transcripts = p.get("transcripts", "gold")
    return f"asr (`{p.get('asr_model')}`)" if transcripts == "asr" else transcripts
