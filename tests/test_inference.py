"""Inference and `emoq eval`: batch invariance, every row reported, metrics that agree with scikit-learn."""

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from test_recipes import make_tone_corpus

from emoq.cli import main as cli
from emoq.inference import EmotionRecognizer
from emoq.models.tiny import build_tiny


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model, processor = build_tiny(["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
                                  lora={"r": 4}, seed=3)
    model.save_pretrained(path / "weights")
    processor.save_pretrained(path / "weights")
    return path


def test_classify_batch_of_16_equals_one_by_one(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    rng = np.random.default_rng(1)
    clips = [(rng.standard_normal(int(16000 * rng.uniform(0.5, 2.0))) * 0.1).astype(np.float32) for _ in range(16)]
    batched = rec.classify_batch(clips, batch_size=16)
    for clip, res in zip(clips, batched):
        one = rec.classify((clip, 16000))
        assert one["label"] == res["label"]
        np.testing.assert_allclose(list(one["log_likelihoods"].values()), list(res["log_likelihoods"].values()),
                                   rtol=1e-5, atol=1e-4)
    assert abs(sum(batched[0]["scores"].values()) - 1) < 1e-5


def test_chat_streams_the_same_text_as_non_streaming(saved_model):
    rec = EmotionRecognizer.from_pretrained(saved_model, device="cpu")
    clip = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    full = rec.chat((clip, 16000), "How does the speaker feel?", max_new_tokens=6)
    streamed = "".join(rec.chat((clip, 16000), "How does the speaker feel?", stream=True, max_new_tokens=6))
    assert streamed.strip() == full


def test_eval_reports_every_row_and_metrics_match_sklearn(saved_model, tmp_path):
    root = make_tone_corpus(tmp_path / "corpus", {"test": 4})
    clips = root / "output_repeated_splits_test"
    (clips / "dia0_utt0.wav").write_bytes(b"this is not audio at all")  # non-audio bytes
    (clips / "dia1_utt0.wav").unlink()  # missing clip
    (clips / "dia2_utt0.wav").write_bytes(b"")  # empty file
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(root), "--split", "test",
                "--out", str(out), "--batch-size", "5"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # every CSV row, errors included
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"test/dia0_utt0", "test/dia1_utt0", "test/dia2_utt0"}
    assert all(("dia" in msg) for msg in errors.values()), errors  # messages name the file
    metrics = json.loads((out / "metrics.json").read_text())
    ok = [r for r in rows if r["status"] == "ok"]
    gold, pred = [r["gold"] for r in ok], [r["pred"] for r in ok]
    assert metrics["rows_ok"] == 9 and metrics["rows_error"] == 3
    assert abs(metrics["weighted_f1"] - f1_score(gold, pred, average="weighted", zero_division=0)) < 1e-9
    assert abs(metrics["accuracy"] - accuracy_score(gold, pred)) < 1e-9
    assert metrics["protocol"]["classes"][0] == "neutral" and metrics["protocol"]["split"] == "test"
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 could not be loaded" in (out / "report.md").read_text()


def test_eval_exits_nonzero_when_nothing_can_be_scored(saved_model, tmp_path):
    root = make_tone_corpus(tmp_path / "corpus", {"test": 1})
    for wav in (root / "output_repeated_splits_test").glob("*.wav"):
        wav.write_bytes(b"%PDF-1.4 not audio")
    assert cli(["eval", "--model", str(saved_model), "--dataset", "meld", "--root", str(root),
                "--out", str(tmp_path / "eval")]) == 1
