"""The two baseline systems (Qieemo, Patamia et al. 2023): padding invariance, what each part computes,
save/load, which parts train, and the same recipe / eval / errors as EmoQ."""

import json

import numpy as np
import pytest
import torch
from support.corpora import LABELS, make_tone_corpus
from transformers import AutoModel, AutoProcessor

from emoq.cli import main as cli
from emoq.config import load_config
from emoq.inference import BaselineRecognizer, EmotionRecognizer
from emoq.models import PatamiaForEmotionClassification
from emoq.models.tiny import build_tiny_baseline
from emoq.recipes import find_shipped, load_recipe
from emoq.training.checkpoint import is_complete

TEXTS = ["the weather report", None, "I will take the train at noon"]
SYSTEMS = [("qieemo", True), ("patamia", True), ("patamia", False)]


def tiny(system: str, with_text: bool = True):
    model, processor = build_tiny_baseline(system, LABELS, seed=0, with_text=with_text)
    return model.eval(), processor


@pytest.mark.parametrize("system,with_text", SYSTEMS)
def test_batch_of_n_equals_batch_of_one(clips, system, with_text):
    model, processor = tiny(system, with_text)
    with torch.no_grad():
        batch = model(**processor(clips, transcripts=TEXTS)).emotion_logits
        for i in range(len(clips)):
            alone = model(**processor(clips[i : i + 1], transcripts=TEXTS[i : i + 1])).emotion_logits
            torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_qieemo_reads_the_middle_layer_and_a_ppg_of_the_final_one(clips):
    model, processor = tiny("qieemo")
    depth = model.config.audio_config.encoder_layers
    assert model.config.feature_layer == depth // 2  # the default: the middle block
    batch = processor(clips)
    with torch.no_grad():
        features, ppg, mask = model.encode(batch["input_features"], batch["feature_attention_mask"])
        hidden = model.speech_encoder._whisper_hidden_states(batch["input_features"], batch["feature_attention_mask"])
    torch.testing.assert_close(features, hidden[depth // 2])
    torch.testing.assert_close(ppg, torch.softmax(model.ppg_head(hidden[-1]), -1))
    assert ppg.shape[-1] == model.config.ppg_dim
    torch.testing.assert_close(ppg.sum(-1), torch.ones(ppg.shape[:2]))
    assert mask.sum(1).tolist() == [50, 75, 125]  # 50 frames per second of audio, padding excluded


def test_patamia_missing_text_is_the_learned_vector_and_wrong_modalities_are_errors(clips):
    model, processor = tiny("patamia")
    with torch.no_grad():
        model.missing_text.normal_()  # trained away from zero, so "missing" is a real vector
        no_text = model(**processor(clips[:1], transcripts=[None])).emotion_logits
        empty_row = model(**processor(clips[:2], transcripts=[None, "the weather report"])).emotion_logits[:1]
        with_text = model(**processor(clips[:1], transcripts=["the weather report"])).emotion_logits
    torch.testing.assert_close(no_text, empty_row, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(no_text, with_text)  # the transcript reaches the prediction
    features = processor(clips[:1])
    with pytest.raises(ValueError, match="no mocap branch"):
        model(**features, mocap=torch.zeros(1, 5, 6))
    audio_only, audio_processor = tiny("patamia", with_text=False)
    with pytest.raises(ValueError, match="no text branch"):
        audio_only(**audio_processor(clips[:1]), text_input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="no chat prompt"):
        audio_processor(clips[:1], with_prompt=True)


def test_patamia_batch_without_any_transcript_still_runs_the_text_branch(clips):
    """DDP needs every trainable parameter in every step's graph: a batch with no transcript at all still
    goes through the text branch (all-zero mask -> the learned "missing" vector)."""
    model, processor = tiny("patamia")
    batch = processor(clips, transcripts=None)
    assert batch["text_attention_mask"].sum() == 0 and batch["text_input_ids"].shape[0] == 3
    model.train()
    model(**batch, emotion_labels=torch.tensor([0, 1, 1])).loss.backward()
    assert model.text_norm.weight.grad is not None and model.missing_text.grad.abs().sum() > 0


def test_patamia_mocap_branch_ignores_padding_frames(clips):
    from emoq.models import PatamiaConfig

    base, processor = tiny("patamia", with_text=False)
    c = base.config
    config = PatamiaConfig(audio_config=c.audio_config, id2label=c.id2label, label2id=c.label2id,
                           fusion_hidden_size=32, contrastive_dim=16, mocap_dim=6, mocap_hidden_size=8)
    torch.manual_seed(0)
    model = PatamiaForEmotionClassification(config).eval()
    mocap = torch.randn(2, 7, 6)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    inputs = processor(clips[:2])
    with torch.no_grad():
        both = model(**inputs, mocap=mocap, mocap_mask=mask).emotion_logits
        second = model(**processor(clips[1:2]), mocap=mocap[1:, :4]).emotion_logits
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("system,with_text", SYSTEMS)
def test_save_load_round_trip_through_auto_classes_and_the_recognizer(clips, tmp_path, system, with_text):
    model, processor = tiny(system, with_text)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    batch = processor(clips, transcripts=TEXTS)
    with torch.no_grad():
        expected = model(**batch).emotion_logits
        torch.testing.assert_close(reloaded(**AutoProcessor.from_pretrained(tmp_path)(clips, transcripts=TEXTS))
                                   .emotion_logits, expected, atol=0, rtol=0)
    rec = EmotionRecognizer.from_pretrained(tmp_path, device="cpu")
    assert isinstance(rec, BaselineRecognizer) and rec.labels == LABELS and rec.use_transcript == (
        system == "patamia" and with_text)
    results = rec.classify_batch(clips, TEXTS if rec.use_transcript else None, batch_size=2)
    probs = torch.softmax(expected if rec.use_transcript else model(**processor(clips)).emotion_logits.detach(), -1)
    for res, p in zip(results, probs):
        assert res["label"] == LABELS[int(p.argmax())]
        assert np.allclose([res["scores"][label] for label in LABELS], p.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="is a classifier"):
        rec.chat((clips[0], 16000), "How do they feel?")


@pytest.mark.parametrize("system", ["qieemo", "patamia"])
def test_one_step_trains_fusion_and_heads_not_the_frozen_encoders(clips, system):
    model, processor = tiny(system)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("speech_encoder.") for n in frozen)
    assert not any(n.startswith(("speech_encoder.", "text_encoder.")) for n in trainable)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(**processor(clips, transcripts=["okay", "fine", "sure"]), emotion_labels=torch.tensor([0, 1, 1]))
    assert out.focal_loss is not None and out.supcon_loss is not None  # MAL, as EmoQ's stage 1
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
    assert {n.split(".")[0] for n in changed} >= {"fusion", "classifier", "contrastive_head"}
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# ---------------------------------------------------------------- recipe, eval, CLI


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": 8, "dev": 3, "test": 3})


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """system -> (output folder, FitResult) of train_baseline on the tone corpus."""
    recipe, done = load_recipe("train_baseline"), {}

    def run(system: str):
        if system not in done:
            out = tmp_path_factory.mktemp(system)
            cfg = load_config(find_shipped(f"{system}/tiny_test"), [
                f"data.root={corpus}", f"trainer.output_dir={out}", "stage1.epochs=12", "stage1.learning_rate=0.01",
                "trainer.batch_size=6", "trainer.eval_every=12", "trainer.save_every=1000"])
            ctx = recipe.setup(cfg)
            result = recipe.train(ctx)
            recipe.cleanup(ctx, result)
            done[system] = (out / "baseline", result)
        return done[system]

    return run


@pytest.mark.parametrize("system", ["qieemo", "patamia"])
def test_train_baseline_learns_and_emoq_eval_scores_it(trained, corpus, tmp_path, system):
    folder, result = trained(system)
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.8 * first, (first, last)
    assert result.best_metric is not None and is_complete(folder / "final")
    config = json.loads((folder / "final/weights/config.json").read_text())
    assert config["model_type"] == system and config["id2label"]["0"] == "neutral"
    out = tmp_path / "eval"
    assert cli(["eval", "--model", str(folder / "final"), "--dataset", "meld", "--root", str(corpus),
                "--split", "test", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows_ok"] == 9 and metrics["protocol"]["classes"][:1] == ["neutral"]
    protocol = metrics["protocol"]  # the results file states how it was made
    assert protocol["seed"] == 0 and protocol["config"].endswith("run_config.yaml")
    assert protocol["dataset"] == "meld" and protocol["split"] == "test" and protocol["mode"] == "score"
    assert {"torch", "transformers", "emoq"} <= set(protocol["versions"])
    assert "weighted_f1" in metrics["metric_definitions"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(abs(sum(r["scores"].values()) - 1) < 1e-5 for r in rows)


def test_chat_and_generate_on_a_baseline_are_clear_errors(trained, corpus, tmp_path):
    folder, _ = trained("qieemo")
    clip = next((corpus / "output_repeated_splits_test").glob("*.wav"))
    with pytest.raises(SystemExit, match="qieemo model is a classifier"):
        cli(["chat", "--model", str(folder / "final"), "--audio", str(clip), "How do they feel?"])
    with pytest.raises(SystemExit, match="qieemo model is a classifier"):
        cli(["eval", "--model", str(folder / "final"), "--dataset", "meld", "--root", str(corpus),
             "--out", str(tmp_path / "gen"), "--mode", "generate"])


def test_baseline_recipe_refuses_emoq_settings(corpus, tmp_path):
    recipe = load_recipe("train_baseline")
    path = find_shipped("qieemo/tiny_test")
    with pytest.raises(SystemExit, match="cache_encoder_features"):
        recipe.setup(load_config(path, [f"data.root={corpus}", "stage1.cache_encoder_features=true"]))
    with pytest.raises(ValueError, match="not a baseline"):
        recipe.setup(load_config(path, [f"data.root={corpus}", "model.system=emoq"]))
    with pytest.raises(ValueError, match="train it with `emoq run train_baseline`"):
        load_recipe("stage1_qformer").setup(load_config(path, [f"data.root={corpus}"]))


def test_export_names_the_baseline_instead_of_failing_deep_inside(trained, tmp_path):
    folder, _ = trained("patamia")
    with pytest.raises(SystemExit, match="holds a patamia model"):
        cli(["export", "--model", str(folder / "final"), "--out", str(tmp_path / "x")])
