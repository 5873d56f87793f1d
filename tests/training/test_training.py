"""The shared training machinery: per-group learning rates with warmup + cosine, non-finite steps skipped,
gradient accumulation, best-checkpoint selection."""

import json
import math

import numpy as np
import pytest
import torch
from support.corpora import tiny_test_config

from emoq.config import StageConfig
from emoq.recipes import find_shipped, load_recipe
from emoq.training.builders import build_optimizer
from emoq.training.checkpoint import is_complete


def test_optimizer_groups_and_warmup_cosine_schedule(tiny):
    model, _ = tiny(lora={"r": 4})
    stage = StageConfig(learning_rate=1e-3, lr_qformer=1e-3, lr_lora=2e-4)
    optimizer, scheduler = build_optimizer(model, stage, weight_decay=0.01, total_steps=20, warmup_ratio=0.1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert {id(p) for p in groups["lora"]["params"]} == lora
    assert lora.isdisjoint(id(p) for p in groups["qformer"]["params"])
    peak = {"lora": 2e-4, "qformer": 1e-3}
    lrs = []
    for _ in range(20):
        lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    for name, top in peak.items():
        assert lrs[0][name] == 0.0 and lrs[1][name] == pytest.approx(top / 2)  # 2 warmup steps
        assert lrs[2][name] == pytest.approx(top)
        for step in range(2, 20):  # cosine from the peak to zero over the remaining 18 steps
            expected = top * 0.5 * (1 + math.cos(math.pi * (step - 2) / 18))
            assert lrs[step][name] == pytest.approx(expected), (name, step)


def test_a_learning_rate_of_zero_freezes_its_group_instead_of_falling_back(tiny):
    """`lr_qformer: 0` keeps the EmoQ-Former side where it is while LoRA trains; 0 is not read as "unset"
    and replaced by `learning_rate`."""
    model, _ = tiny(lora={"r": 4})
    stage = StageConfig(learning_rate=1e-3, lr_qformer=0.0)
    optimizer, _ = build_optimizer(model, stage, weight_decay=0.01, total_steps=4, warmup_ratio=0.0)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {
        "lora": 1e-3, "qformer": 0.0, "qformer_no_decay": 0.0}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert moved == {n for n in trainable if "lora_" in n}


def test_non_finite_loss_steps_are_skipped_every_parameter_stays_finite(corpus, tmp_path, caplog):
    """A NaN loss still runs backward (so every rank stays in step), and its optimiser step is skipped: the
    step counts, the optimiser applies one update fewer, no parameter turns non-finite."""
    stage1 = load_recipe("stage1_qformer")
    ctx = stage1.setup(tiny_test_config(corpus, tmp_path, "trainer.max_steps=4", "trainer.eval_every=100"))
    forward, calls = ctx.model.forward, []

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if not ctx.model.training:  # dev evaluation
            return out
        calls.append(1)
        if len(calls) == 2:  # the second batch's loss is NaN (a bad clip, an fp16 overflow ...)
            out.loss = out.loss * float("nan")
        return out

    ctx.model.forward = poisoned
    with caplog.at_level("WARNING", logger="emoq.training"):
        result = stage1.train(ctx)
    assert result.skipped_steps == 1 and result.step == 4 and len(calls) == 4
    adam_steps = {int(s["step"]) for s in ctx.optimizer.optimizer.state.values()}
    assert adam_steps == {3}, adam_steps  # 4 steps, the NaN one not applied
    assert np.isnan(result.losses[1]) and np.isfinite(np.delete(result.losses, 1)).all()
    assert all(torch.isfinite(p).all() for p in ctx.model.parameters())
    assert any("non-finite loss" in r.message for r in caplog.records)
    state = json.loads((tmp_path / "stage1" / "final" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_gradient_accumulation_steps_once_per_window(corpus, tmp_path):
    """24 clips, batches of 4 -> 6 batches; accumulating 2 -> 3 optimiser steps per epoch, the recorded loss
    of a step being the mean over its 2 batches."""
    stage1 = load_recipe("stage1_qformer")
    ctx = stage1.setup(tiny_test_config(corpus, tmp_path, "trainer.gradient_accumulation_steps=2", "trainer.batch_size=4",
                            "stage1.epochs=1", "trainer.eval_every=100"))
    inner, steps = ctx.optimizer.optimizer, []
    original = inner.step

    def counted(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    inner.step = counted
    result = stage1.train(ctx)
    assert result.step == 3 and len(steps) == 3 and len(result.losses) == 3


def test_best_checkpoint_is_the_best_dev_score(corpus, tmp_path):
    stage1 = load_recipe("stage1_qformer")
    ctx = stage1.setup(tiny_test_config(corpus, tmp_path, "stage1.epochs=6", "trainer.eval_every=3", "stage1.learning_rate=0.01"))
    result = stage1.train(ctx)
    scores = [h["weighted_f1"] for h in result.history]
    assert result.step == 36 and len(scores) == 12 and result.best_metric == max(scores)  # 6 batches/epoch
    assert result.best_step == result.history[scores.index(max(scores))]["step"]
    assert is_complete(tmp_path / "stage1" / "best")


def test_iemocap_dev_is_carved_from_the_training_sessions_never_the_test_fold(tmp_path):
    from support.media import build_iemocap_tree

    from emoq.config import load_config
    from emoq.training.builders import load_split

    root = build_iemocap_tree(tmp_path / "iemocap", write_wavs=False)
    cfg = load_config(find_shipped("emoq/tiny_test"),
                      ["data.dataset=iemocap", f"data.root={root}", "data.label_set=iemocap4", "data.fold=2",
                       "data.dev_fraction=0.25"])
    train, dev, test = (load_split(cfg, s) for s in ("train", "dev", "test"))
    keys = [{u.key for u in part} for part in (train, dev, test)]
    assert {u.split for u in test} == {"Session2"} and len(test) == 9
    assert not any(u.split == "Session2" for u in train + dev)
    assert not (keys[0] & keys[1]) and len(train) + len(dev) == 36 and 3 <= len(dev) <= 16
    assert [u.key for u in load_split(cfg, "dev")] == [u.key for u in dev]  # the same split every time
    cfg.data.dev_fraction = 0.0  # the papers' protocol: select on the held-out session (stated as a leak)
    assert {u.key for u in load_split(cfg, "dev")} == keys[2] and len(load_split(cfg, "train")) == 36
