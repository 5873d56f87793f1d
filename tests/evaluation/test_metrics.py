"""Metrics against hand computations and closed forms."""

from __future__ import annotations

import random

import pytest

from emoq.evaluation.metrics import (
    METRIC_DEFINITIONS,
    compute_metrics,
    format_metrics_table,
    plot_confusion_matrix,
)
from emoq.labels import UNMAPPED

LABELS = ["neutral", "joy", "anger"]
MELD7 = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


def test_hand_example():
    y_true = ["neutral", "neutral", "neutral", "joy", "joy", "anger"]
    y_pred = ["neutral", "neutral", "joy", "joy", "anger", "anger"]
    m = compute_metrics(y_true, y_pred, LABELS)
    # neutral: P 2/2, R 2/3, F1 0.8 | joy: P 1/2, R 1/2, F1 0.5 | anger: P 1/2, R 1/1, F1 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["unweighted_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["per_class"]["neutral"] == pytest.approx(
        {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    )
    assert m["per_class"]["joy"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["anger"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["confusion_matrix_columns"] == LABELS
    assert m["num_samples"] == 6 and m["labels"] == LABELS and m["num_unknown_predictions"] == 0


def test_int_ids_give_same_result():
    y_true = ["neutral", "neutral", "neutral", "joy", "joy", "anger"]
    y_pred = ["neutral", "neutral", "joy", "joy", "anger", "anger"]
    ids = {name: i for i, name in enumerate(LABELS)}
    assert compute_metrics([ids[y] for y in y_true], [ids[y] for y in y_pred], LABELS) == compute_metrics(
        y_true, y_pred, LABELS
    )


@pytest.mark.parametrize("n_neutral,n_total", [(47, 100), (1256, 2610), (3, 4)])
def test_all_neutral_predictor_closed_form(n_neutral, n_total):
    rng = random.Random(n_total)
    others = [rng.choice(MELD7[1:]) for _ in range(n_total - n_neutral)]
    y_true = ["neutral"] * n_neutral + others
    rng.shuffle(y_true)
    m = compute_metrics(y_true, ["neutral"] * n_total, MELD7)
    p = n_neutral / n_total
    assert m["weighted_f1"] == pytest.approx(p * 2 * p / (1 + p), abs=1e-12)
    assert m["accuracy"] == pytest.approx(p)
    n_present = len(set(y_true))
    assert m["unweighted_accuracy"] == pytest.approx(1 / n_present)  # recall 1 for neutral, 0 elsewhere
    assert m["per_class"]["neutral"]["precision"] == pytest.approx(p)


def test_ua_is_mean_recall_over_present_classes_and_matches_python_reference():
    rng = random.Random(0)
    y_true = [rng.choice(MELD7[:6]) for _ in range(300)]  # "anger" never occurs in gold
    y_pred = [rng.choice(MELD7) for _ in range(300)]
    m = compute_metrics(y_true, y_pred, MELD7)
    present = [c for c in MELD7 if c in y_true]
    recalls = [m["per_class"][c]["recall"] for c in present]
    assert m["unweighted_accuracy"] == pytest.approx(sum(recalls) / len(recalls))
    # independent F1 computation
    f1 = {}
    for c in MELD7:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        f1[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    support = {c: y_true.count(c) for c in MELD7}
    assert m["weighted_f1"] == pytest.approx(sum(f1[c] * support[c] for c in MELD7) / 300)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 7)  # anger is predicted, so it counts
    assert [sum(row) for row in m["confusion_matrix"]] == [support[c] for c in MELD7]


def test_unknown_predictions_are_wrong_and_get_a_column():
    y_true = ["neutral", "joy", "anger", "anger"]
    y_pred = ["neutral", "I think happy", None, 99]
    m = compute_metrics(y_true, y_pred, LABELS)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["num_unknown_predictions"] == 3
    assert m["confusion_matrix_columns"] == LABELS + [UNMAPPED]
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
    assert m["per_class"]["joy"]["recall"] == 0.0 and m["per_class"]["neutral"]["precision"] == 1.0
    assert m["unweighted_accuracy"] == pytest.approx(1 / 3)
    assert m["weighted_f1"] == pytest.approx(0.25)  # only neutral has F1 = 1, support 1 of 4
    assert m["macro_f1"] == pytest.approx(1 / 3)


def test_errors():
    with pytest.raises(ValueError, match="not in the label set"):
        compute_metrics(["calm"], ["neutral"], LABELS)
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics(["joy", "joy"], ["joy"], LABELS)
    with pytest.raises(ValueError, match="no samples"):
        compute_metrics([], [], LABELS)


def test_definitions_cover_headline_metrics():
    for key in (
        "accuracy",
        "unweighted_accuracy",
        "weighted_f1",
        "macro_f1",
        "per_class",
        "confusion_matrix",
    ):
        assert METRIC_DEFINITIONS[key].strip().endswith(".")


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix_writes_png(tmp_path, normalize):
    m = compute_metrics(["neutral", "joy", "anger", "anger"], ["neutral", "joy", "unknown", "joy"], LABELS)
    path = plot_confusion_matrix(
        m["confusion_matrix"], m["labels"], tmp_path / "sub" / "cm.png", normalize=normalize, title="test"
    )
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with pytest.raises(ValueError, match="does not fit"):
        plot_confusion_matrix([[1, 0], [0, 1]], LABELS, tmp_path / "bad.png")


def test_format_metrics_table():
    m = compute_metrics(["neutral", "joy", "anger", "anger"], ["neutral", "joy", "anger", "x"], LABELS)
    table = format_metrics_table(m)
    assert "| accuracy (WA) | 75.00 |" in table
    assert "| weighted F1 |" in table and "| unknown predictions | 1 |" in table
    assert "| anger | 100.00 | 50.00 | 66.67 | 2 |" in table
