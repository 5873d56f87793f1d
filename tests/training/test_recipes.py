"""Recipes on tiny random models: loss goes down, stage 2 starts from stage 1, resume is exact,
a killed checkpoint write leaves the previous checkpoint loadable."""

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from support.corpora import tiny_test_config

from emoq.recipes import load_recipe
from emoq.training.checkpoint import is_complete, latest_checkpoint


def test_stage1_learns_and_stage2_starts_from_it(corpus, tmp_path):
    stage1, stage2 = load_recipe("stage1_qformer"), load_recipe("stage2_llm")
    cfg = tiny_test_config(corpus, tmp_path, "stage1.epochs=30", "stage1.learning_rate=0.01", "model.qformer.hidden_dropout_prob=0.0", "stage2.epochs=6", "stage2.learning_rate=0.03",
               "trainer.batch_size=6", "trainer.save_every=1000", "trainer.eval_every=30")
    ctx = stage1.setup(cfg)
    result = stage1.train(ctx)
    stage1.cleanup(ctx, result)
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.8 * first, (first, last)
    assert result.best_metric is not None and len(result.history) == 4  # dev evaluated every 30 steps
    assert is_complete(tmp_path / "stage1" / "final")

    ctx2 = stage2.setup(cfg)
    # stage 2 starts from the stage-1 EmoQ-Former, not a fresh one
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "stage1/best/weights/model.safetensors")  # the dev-selected checkpoint
    torch.testing.assert_close(ctx2.accelerator.unwrap_model(ctx2.model).qformer.query_tokens.detach(),
                               saved["qformer.query_tokens"])
    result2 = stage2.train(ctx2)
    stage2.cleanup(ctx2, result2)
    assert all(np.isfinite(result2.losses))
    # the LM term dominates here (a random tiny LLM starts near ln(vocab) ~ 6 nats); LoRA on its attention
    # alone moves it slowly but steadily: the last steps are clearly below the first (batch noise ~0.3)
    first, last = np.mean(result2.losses[:3]), np.mean(result2.losses[-3:])
    assert last < first - 0.4, result2.losses
    weights = tmp_path / "stage2/final/weights"
    adapter = load_file(weights / "adapter/adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # a saved adapter is never empty
    assert json.loads((weights / "config.json").read_text())["id2label"]["0"] == "neutral"


@pytest.mark.parametrize("cache", [False, True])
def test_stage1_feature_cache_matches_live_encoder_and_layer_mix(corpus, tmp_path, cache):
    """The cache feeds the EmoQ-Former the same frames as the live encoder (same first loss); the learned
    layer mix trains on live frames and, with a cache (frames already mixed), stays at its initial weights."""
    stage1 = load_recipe("stage1_qformer")
    cfg = tiny_test_config(corpus, tmp_path, "model.encoder_layers=[1,2]", f"stage1.cache_encoder_features={cache}",
               "model.qformer.hidden_dropout_prob=0.0", "trainer.max_steps=3", "trainer.eval_every=100")
    ctx = stage1.setup(cfg)
    mix = ctx.accelerator.unwrap_model(ctx.model).speech_encoder.layer_weights
    before = mix.detach().clone()
    result = stage1.train(ctx)
    assert mix.requires_grad is not cache
    assert torch.equal(mix.detach(), before) is cache
    other = stage1.setup(tiny_test_config(corpus, tmp_path / "other", "model.encoder_layers=[1,2]",
                              f"stage1.cache_encoder_features={not cache}", "model.qformer.hidden_dropout_prob=0.0",
                              "trainer.max_steps=1", "trainer.eval_every=100"))
    assert stage1.train(other).losses[0] == pytest.approx(result.losses[0], rel=1e-5, abs=1e-6)


def test_encoder_frame_cache_is_kept_on_disk_and_reused_until_its_inputs_change(corpus, tmp_path, monkeypatch):
    from emoq.models.speech_encoder import SpeechEncoder
    from emoq.training.frame_cache import EncoderFrameCache

    stage1 = load_recipe("stage1_qformer")
    options = ("stage1.cache_encoder_features=true", "trainer.eval_every=100")
    stage1.setup(tiny_test_config(corpus, tmp_path, *options))
    shard = tmp_path / "stage1" / "encoder_frames" / "shard-00000-of-00001.safetensors"
    frames = EncoderFrameCache([shard])
    assert len(frames) == 24 and all(45 <= frames[k].shape[0] <= 50 for k in frames)  # 0.9-1 s: 50 frames/s
    calls = []
    forward = SpeechEncoder.forward
    monkeypatch.setattr(SpeechEncoder, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    stage1.setup(tiny_test_config(corpus, tmp_path, *options))
    assert calls == []  # same encoder, layers and clips: read back, the encoder never runs
    stage1.setup(tiny_test_config(corpus, tmp_path, *options, "data.max_seconds=0.5"))
    frames = EncoderFrameCache([shard])
    assert calls and all(frames[k].shape[0] == 25 for k in frames)  # other inputs: rebuilt


@pytest.mark.parametrize("recipe,stage", [("stage1_qformer", "stage1"), ("stage2_llm", "stage2")])
def test_resume_reproduces_the_uninterrupted_run(corpus, tmp_path, capsys, recipe, stage):
    """Interrupted after step 4 (last checkpoint: step 3), rerun: the same losses and weights as a run that
    never stopped — with dropout on (RNG state restored), mid-epoch (skip_first_batches), and in stage 2
    with LoRA dropout and the LM loss."""
    trainer = load_recipe(recipe)
    common = ("trainer.max_steps=8", "trainer.save_every=3", "trainer.batch_size=4", "trainer.eval_every=100",
              "model.qformer.hidden_dropout_prob=0.1", "model.lora.lora_dropout=0.1", "stage2.init_from=null")
    ctx = trainer.setup(tiny_test_config(corpus, tmp_path / "full", *common))
    full = trainer.train(ctx)
    ctx = trainer.setup(tiny_test_config(corpus, tmp_path / "cut", *common))
    part = trainer.train(ctx, stop_after=4)  # "interrupted" after step 4: last checkpoint is step 3
    assert part.step == 4 and latest_checkpoint(tmp_path / "cut" / stage).name == "checkpoint-3"
    ctx = trainer.setup(tiny_test_config(corpus, tmp_path / "cut", *common))
    capsys.readouterr()
    resumed = trainer.train(ctx)
    assert "checkpoint-3 at step 3" in capsys.readouterr().out  # resumed, not restarted
    assert resumed.step == 8
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-6, atol=1e-6)
    from safetensors.torch import load_file

    a = load_file(tmp_path / f"full/{stage}/final/weights/model.safetensors")
    b = load_file(tmp_path / f"cut/{stage}/final/weights/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(corpus, tmp_path):
    """A child process saves checkpoint-1, then is SIGKILLed while writing checkpoint-2's weights."""
    script = tmp_path / "kill_during_save.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from emoq.recipes import find_shipped, load_recipe
        s1 = load_recipe("stage1_qformer")
        from emoq.config import load_config
        import emoq.training.checkpoint as ck
        cfg = load_config(find_shipped("emoq/tiny_test"),
                          ["data.root={corpus}", "trainer.output_dir={tmp_path}", "trainer.max_steps=3",
                           "trainer.save_every=1", "trainer.eval_every=100"])
        original = ck.save_config
        calls = []
        def dying_save_config(cfg, path):
            calls.append(path)
            original(cfg, path)
            if len(calls) == 2:  # checkpoint-1 completes; checkpoint-2 dies before its trainer_state.json
                os.kill(os.getpid(), signal.SIGKILL)
        ck.save_config = dying_save_config
        ctx = s1.setup(cfg)
        s1.train(ctx)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out = tmp_path / "stage1"
    assert (out / ".checkpoint-2.tmp").exists()  # the interrupted write
    assert latest_checkpoint(out).name == "checkpoint-1"
    from emoq.models import EmoQForConditionalGeneration

    EmoQForConditionalGeneration.from_pretrained(out / "checkpoint-1" / "weights")


def test_stage2_trains_on_rationales_from_a_manifest_and_scores_label_heads(corpus, tmp_path):
    from emoq.data.meld import read_meld
    from emoq.inference import EmotionRecognizer

    why = {"neutral": "The pitch stays low and steady.", "joy": "The pitch is bright and high.",
           "anger": "The pitch is very high and sharp."}
    for split, name in (("train", "train"), ("dev", "dev")):
        rows = [{"key": u.key, "audio": str(u.audio), "label": u.label, "rationale": why[u.label]}
                for u in read_meld(corpus, split)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tiny_test_config(corpus, tmp_path / "run", "data.dataset=manifest", f"data.train_manifest={tmp_path / 'train.jsonl'}",
               f"data.eval_manifest={tmp_path / 'dev.jsonl'}", "data.rationale=true", "stage2.init_from=null",
               "trainer.max_steps=3", "trainer.eval_every=100")
    stage2 = load_recipe("stage2_llm")
    ctx = stage2.setup(cfg)
    batch = next(iter(ctx.loader))
    answers = [ctx.processor.tokenizer.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert all("\nThe pitch" in a for a in answers), answers  # the rationale is part of the trained answer
    result = stage2.train(ctx)
    stage2.cleanup(ctx, result)
    rec = EmotionRecognizer.from_pretrained(tmp_path / "run" / "stage2" / "final", device="cpu")
    assert rec.processor.rationale_separator == "\n"
    assert all(rec.processor.tokenizer.decode(c).endswith("\n") for c in rec.processor.label_candidates())
    clip = next((corpus / "dev_splits_complete").glob("*.wav"))
    assert rec.classify(str(clip))["label"] in why
