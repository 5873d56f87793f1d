"""`emoq predict` (every input reported, same answers as classify, the transcript read and its source) and
`emoq export` (reloads, merges LoRA)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from support.media import read_jsonl

from emoq.audio import write_wav
from emoq.cli import main as cli
from emoq.inference import EmotionRecognizer
from emoq.models.tiny import build_tiny

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    """A tiny saved model whose LoRA-B weights are non-zero (so merging really changes the base weights)."""
    path = tmp_path_factory.mktemp("model")
    model, processor = build_tiny(LABELS, lora={"r": 4}, seed=3)
    torch.manual_seed(0)
    with torch.no_grad():
        n = 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
                n += 1
    assert n > 0
    model.save_pretrained(path / "weights")
    processor.save_pretrained(path / "weights")
    return path


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(7)
    return [write_wav(folder / f"clip{i}.wav", (rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32))
            for i, s in enumerate((0.6, 1.3, 0.9))]


def _clip(seed: int, seconds: float = 1.0):
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000


def test_predict_reports_every_input_in_order(lora_model, wavs, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"this is not audio at all")
    missing = tmp_path / "missing.wav"
    inputs = [str(wavs[0]), str(corrupt), str(wavs[1]), str(missing), str(wavs[2])]
    out = tmp_path / "preds" / "predictions.jsonl"
    assert cli(["predict", "--model", str(lora_model), "--out", str(out), "--batch-size", "2", *inputs]) == 0
    rows = read_jsonl(out)
    assert [r["input"] for r in rows] == inputs
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "error", "ok"]
    for r in rows:
        assert set(r) == {"input", "label", "scores", "transcript", "transcript_source", "status", "error",
                          "truncated_to"}
        assert r["truncated_to"] is None  # every clip scored whole
    # no text and no ASR model (no run config): the model read none; error rows read nothing
    assert [r["transcript_source"] for r in rows] == ["none", None, "none", None, "none"]
    assert {r["transcript"] for r in rows} == {None}
    assert "corrupt.wav" in rows[1]["error"] and "not a decodable audio file" in rows[1]["error"]
    assert "missing.wav" in rows[3]["error"] and "file not found" in rows[3]["error"]
    assert rows[1]["label"] is None and rows[1]["scores"] is None

    rec = EmotionRecognizer.from_pretrained(lora_model, device="cpu")
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["error"] is None
        expected = rec.classify(r["input"])
        assert r["label"] == expected["label"]
        assert list(r["scores"]) == LABELS  # id order
        np.testing.assert_allclose(list(r["scores"].values()), list(expected["scores"].values()), rtol=1e-5, atol=1e-6)


def test_predict_says_which_clips_were_cut_to_the_models_maximum(lora_model, wavs, tmp_path):
    long = write_wav(tmp_path / "long.wav", (np.random.default_rng(1).standard_normal(16000 * 31) * 0.1)
                     .astype(np.float32))
    exact = write_wav(tmp_path / "exact.wav", np.full(16000 * 30, 0.1, np.float32))
    inputs = [str(long), str(wavs[0]), str(exact), str(tmp_path / "missing.wav")]
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--model", str(lora_model), "--out", str(out), *inputs]) == 0
    rows = read_jsonl(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert [r["truncated_to"] for r in rows] == [30.0, None, None, None]  # 30 s exactly is not cut
    # what was scored is the first 30 s
    rec = EmotionRecognizer.from_pretrained(lora_model, device="cpu")
    first_30s = rec.classify((rec.load(str(long))[: 16000 * 30], 16000))
    np.testing.assert_allclose(list(rows[0]["scores"].values()), list(first_30s["scores"].values()),
                               rtol=1e-5, atol=1e-6)


def test_predict_manifest_and_nothing_predictable(lora_model, wavs, tmp_path):
    manifest = tmp_path / "m.jsonl"
    rows = [{"key": "a", "audio": str(wavs[0]), "label": "joy", "text": "the weather report"},
            {"key": "b", "audio": str(tmp_path / "gone.wav"), "label": "anger"},
            {"key": "c", "audio": None, "status": "error", "error": "c.mp4: conversion failed"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--model", str(lora_model), "--out", str(out), "--manifest", str(manifest)]) == 0
    got = read_jsonl(out)
    assert [(r["key"], r["status"], r["gold"]) for r in got] == [("a", "ok", "joy"), ("b", "error", "anger"),
                                                                  ("c", "error", None)]
    assert "gone.wav" in got[1]["error"] and got[2]["error"] == "c.mp4: conversion failed"
    expected = EmotionRecognizer.from_pretrained(lora_model, device="cpu").classify(str(wavs[0]), text="the weather report")
    assert got[0]["label"] == expected["label"]
    assert (got[0]["transcript"], got[0]["transcript_source"]) == ("the weather report", "gold")

    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"%PDF-1.4 not audio")
    assert cli(["predict", "--model", str(lora_model), "--out", str(tmp_path / "none.jsonl"), str(bad)]) == 1
    assert read_jsonl(tmp_path / "none.jsonl")[0]["status"] == "error"


def test_predict_transcribes_the_inputs_without_text_with_the_run_configs_asr(lora_model, wavs, tmp_path,
                                                                              stub_asr):
    import shutil

    import yaml

    model = tmp_path / "model"
    shutil.copytree(lora_model, model)
    (model / "weights" / "run_config.yaml").write_text(yaml.safe_dump({"model": {"asr": "run/whisper"}}))
    texts = tmp_path / "texts.txt"
    texts.write_text("what a day\n\n\n")  # the first input has a transcript, the others none
    out = tmp_path / "p.jsonl"
    assert cli(["predict", "--model", str(model), "--out", str(out), "--text-file", str(texts), *map(str, wavs)]) == 0
    rows = read_jsonl(out)
    assert [(r["transcript"], r["transcript_source"]) for r in rows] == [
        ("what a day", "gold"), ("heard 20800 samples", "asr"), ("heard 14400 samples", "asr")]
    (ref, asr), = stub_asr
    assert ref == "run/whisper" and asr.calls == [[20800, 14400]]  # one call, only the inputs without text
    rec = EmotionRecognizer.from_pretrained(lora_model, device="cpu")
    expected = rec.classify_batch([str(w) for w in wavs], [r["transcript"] for r in rows])
    assert [r["label"] for r in rows] == [e["label"] for e in expected]
    for r, e in zip(rows, expected):
        np.testing.assert_allclose(list(r["scores"].values()), list(e["scores"].values()), rtol=1e-5, atol=1e-6)

    assert cli(["predict", "--model", str(model), "--out", str(out), "--asr", "none", str(wavs[0])]) == 0
    assert read_jsonl(out)[0]["transcript_source"] == "none" and len(stub_asr) == 1
    assert cli(["predict", "--model", str(model), "--out", str(out), "--asr", "flag/whisper", str(wavs[0])]) == 0
    assert read_jsonl(out)[0]["transcript_source"] == "asr" and stub_asr[-1][0] == "flag/whisper"


def _safetensors_keys(folder):
    keys = []
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys += list(st.keys())
    return keys


def test_export_keeps_lora_and_reloads_identically(lora_model, tmp_path):
    from transformers import AutoModel

    from emoq.models import EmoQForConditionalGeneration, EmoQProcessor

    out = tmp_path / "export"
    assert cli(["export", "--model", str(lora_model), "--out", str(out)]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert any("lora_" in k for k in _safetensors_keys(out))
    assert json.loads((out / "labels.json").read_text())["labels"] == LABELS

    card = (out / "README.md").read_text()
    positions = [card.index(f"| {i} | {label} |") for i, label in enumerate(LABELS)]
    assert positions == sorted(positions)
    assert "EmotionRecognizer.from_pretrained" in card and "llama" in card
    from huggingface_hub import ModelCard

    metadata = ModelCard.load(out / "README.md").data
    assert (metadata.library_name, metadata.pipeline_tag) == ("emoq", "audio-classification")

    assert isinstance(AutoModel.from_pretrained(out), EmoQForConditionalGeneration)
    assert EmoQProcessor.from_pretrained(out).labels == LABELS
    original = EmotionRecognizer.from_pretrained(lora_model, device="cpu")
    exported = EmotionRecognizer.from_pretrained(out, device="cpu")
    clips = [_clip(1)[0], _clip(2, 1.7)[0]]
    assert torch.equal(original.score_batch(clips), exported.score_batch(clips))
    assert original.classify(_clip(3)) == exported.classify(_clip(3))


def test_export_merge_lora_matches_original(lora_model, tmp_path):
    from emoq.models import EmoQForConditionalGeneration

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({
        "accuracy": 0.5, "unweighted_accuracy": 0.4, "weighted_f1": 0.4567, "macro_f1": 0.3, "num_samples": 10,
        "per_class": {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1} for label in LABELS},
        "rows_ok": 10, "rows_total": 11, "rows_error": 1, "protocol": {"dataset": "meld", "split": "test", "mode": "score"},
    }))
    out = tmp_path / "merged"
    assert cli(["export", "--model", str(lora_model / "weights"), "--out", str(out), "--merge-lora",
                "--metrics", str(metrics)]) == 0
    keys = _safetensors_keys(out)
    assert keys and not any("lora_" in k for k in keys)
    assert not (out / "adapter").exists()
    model = EmoQForConditionalGeneration.from_pretrained(out)
    assert model.config.lora is None
    assert not any("lora" in name for name, _ in model.named_modules())
    card = (out / "README.md").read_text()
    assert "45.67" in card and "merged" in card and "meld (test)" in card

    original = EmotionRecognizer.from_pretrained(lora_model, device="cpu")
    merged = EmotionRecognizer.from_pretrained(out, device="cpu")
    # the merge changed the base weights (non-zero LoRA-B), and the scores still agree
    before = dict(original.model.named_parameters())
    after = dict(merged.model.named_parameters())
    q = "language_model.model.layers.0.self_attn.q_proj"
    assert (after[f"{q}.weight"] - before[f"{q}.base_layer.weight"]).abs().max() > 1e-2
    for seed in (4, 5):
        a, b = original.classify(_clip(seed)), merged.classify(_clip(seed))
        assert a["label"] == b["label"]
        np.testing.assert_allclose(list(a["log_likelihoods"].values()), list(b["log_likelihoods"].values()),
                                   rtol=0, atol=1e-4)


def test_export_refuses_to_overwrite(lora_model, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        cli(["export", "--model", str(lora_model), "--out", str(tmp_path / "busy")])
    with pytest.raises(SystemExit, match="overwrite the model"):
        cli(["export", "--model", str(lora_model), "--out", str(lora_model), "--force"])
    assert (lora_model / "weights" / "config.json").is_file()
