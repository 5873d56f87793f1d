"""Evaluation metrics for speech emotion recognition (scikit-learn underneath).

The field reports several numbers that are easy to confuse, so every results file should carry
:data:`METRIC_DEFINITIONS` next to the values:

* **WA** (``accuracy``): fraction of utterances classified correctly (IEMOCAP "weighted accuracy").
* **UA** (``unweighted_accuracy``): mean per-class recall, averaged over the classes that occur in the
  gold labels (``sklearn.metrics.balanced_accuracy_score``).  A class absent from the gold labels has
  undefined recall; counting it as 0 would punish a test split for what it lacks, so it is left out.
* **weighted F1**: per-class F1 averaged with gold support as weights (the MELD headline).
* **macro F1**: unweighted mean of per-class F1 over the label-set classes that occur in the gold
  labels or in the predictions (scikit-learn's default class set, restricted to ``labels``).

Predictions outside the label set (an LLM answering "unknown" or free text that maps to no class)
are wrong answers, never dropped: they get an explicit extra confusion-matrix column
(:data:`UNMAPPED`) and are counted in ``num_unknown_predictions``.  Matching is exact: mapping
free text or aliases to labels belongs to the inference code, before metrics.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from ..labels import UNMAPPED

__all__ = [
    "METRIC_DEFINITIONS",
    "compute_metrics",
    "plot_confusion_matrix",
    "format_metrics_table",
]

METRIC_DEFINITIONS: dict[str, str] = {
    "accuracy": "WA: fraction of utterances whose predicted label equals the gold label "
    "(predictions outside the label set count as wrong).",
    "unweighted_accuracy": "UA: mean of per-class recall over the classes present in the gold labels "
    "(sklearn balanced_accuracy_score).",
    "weighted_f1": "Mean of per-class F1 weighted by each class's gold support (the MELD headline metric).",
    "macro_f1": "Unweighted mean of per-class F1 over label-set classes occurring in the gold labels or "
    "predictions.",
    "per_class": "Precision, recall, F1 and gold support of each class (0 where undefined).",
    "confusion_matrix": "Counts with rows = gold and columns = predicted, both in label-set order, plus a "
    f"final '{UNMAPPED}' column when some predictions fall outside the label set.",
    "num_unknown_predictions": "Number of predictions that are not in the label set (counted as wrong).",
    "num_samples": "Number of scored utterances.",
}


def _to_index(values: Sequence, labels: list[str], *, gold: bool) -> np.ndarray:
    """Map label strings or int ids to ``0..K-1``; out-of-set predictions become ``K``."""
    lookup = {name: i for i, name in enumerate(labels)}
    k = len(labels)
    out = np.empty(len(values), dtype=np.int64)
    for j, v in enumerate(values):
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            idx = int(v) if 0 <= int(v) < k else None
        elif isinstance(v, str):
            idx = lookup.get(v)
        else:
            idx = None
        if idx is None:
            if gold:
                raise ValueError(
                    f"compute_metrics: gold label {v!r} (row {j}) is not in the label set {labels}; "
                    "map the corpus labels to the class set first"
                )
            idx = k
        out[j] = idx
    return out


def compute_metrics(y_true: Sequence, y_pred: Sequence, labels: Sequence[str]) -> dict:
    """WA, UA, weighted/macro F1, per-class scores and the confusion matrix.

    Args:
        y_true: gold labels, as strings from ``labels`` or int ids into ``labels``.
        y_pred: predictions, same forms; anything not in ``labels`` (unknown strings, None, ids out
            of range) counts as a wrong answer in an extra ``<unmapped>`` column.
        labels: the class order used for ids, the per-class table and the confusion matrix.
    """
    labels = [str(x) for x in labels]
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"compute_metrics: labels must be non-empty and unique, got {labels}")
    if UNMAPPED in labels:
        raise ValueError(f"compute_metrics: {UNMAPPED!r} is reserved for out-of-set predictions")
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"compute_metrics: {len(y_true)} gold labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("compute_metrics: no samples to score")

    k = len(labels)
    t = _to_index(y_true, labels, gold=True)
    p = _to_index(y_pred, labels, gold=False)
    known = list(range(k))
    num_unknown = int((p == k).sum())

    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=known, zero_division=0)
    present = sorted(set(t.tolist()) | (set(p.tolist()) - {k}))
    with warnings.catch_warnings():
        # balanced_accuracy warns when y_pred has classes absent from y_true (e.g. <unmapped>); their
        # recall is undefined and sklearn drops them, which is the documented choice.
        warnings.simplefilter("ignore", UserWarning)
        ua = balanced_accuracy_score(t, p)

    columns = known + [k] if num_unknown else known
    cm = confusion_matrix(t, p, labels=columns)[:k]  # the <unmapped> row would be all zeros
    return {
        "accuracy": float(accuracy_score(t, p)),
        "unweighted_accuracy": float(ua),
        "weighted_f1": float(f1_score(t, p, labels=known, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(t, p, labels=present, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_columns": labels + ([UNMAPPED] if num_unknown else []),
        "num_unknown_predictions": num_unknown,
        "num_samples": len(t),
        "labels": labels,
    }


def plot_confusion_matrix(cm, labels: Sequence[str], path, normalize: bool = True, title: str | None = None):
    """Write the confusion matrix as a PNG and return the path.

    Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
    switch, so it is safe in headless jobs and inside other people's notebooks).  ``normalize``
    divides each gold row by its total (cells become per-class recall; empty rows stay 0).  A
    matrix with one more column than ``labels`` gets the ``<unmapped>`` column name.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=float)
    labels = [str(x) for x in labels]
    if cm.ndim != 2 or cm.shape[0] != len(labels) or cm.shape[1] not in (len(labels), len(labels) + 1):
        raise ValueError(f"plot_confusion_matrix: matrix {cm.shape} does not fit {len(labels)} labels")
    columns = labels + [UNMAPPED] * (cm.shape[1] - len(labels))
    values = cm
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)

    size = 1.6 + 0.75 * max(len(labels), len(columns))
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    threshold = values.max() / 2 if values.size and values.max() > 0 else 0.5
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = f"{values[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if values[i, j] > threshold else "black",
            )
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def format_metrics_table(metrics: dict) -> str:
    """Markdown: a headline table (WA, UA, weighted F1, macro F1, n) and a per-class table."""
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| accuracy (WA) | {metrics['accuracy'] * 100:.2f} |",
        f"| unweighted accuracy (UA) | {metrics['unweighted_accuracy'] * 100:.2f} |",
        f"| weighted F1 | {metrics['weighted_f1'] * 100:.2f} |",
        f"| macro F1 | {metrics['macro_f1'] * 100:.2f} |",
        f"| samples | {metrics['num_samples']} |",
    ]
    if metrics.get("num_unknown_predictions"):
        lines.append(f"| unknown predictions | {metrics['num_unknown_predictions']} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"| {name} | {row['precision'] * 100:.2f} | {row['recall'] * 100:.2f} | "
            f"{row['f1'] * 100:.2f} | {row['support']} |"
        )
    return "\n".join(lines) + "\n"
