"""The plumbing every recipe shares once its model is built: data, optimiser, `accelerator.prepare`,
the `fit` call from the config, and the command-line `main`.

What makes a recipe a recipe stays in its file: which model it builds, which parts train, which
stage section of the config it reads and how dev predictions are made ("head" or "score").
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

from ..config import RunConfig, StageConfig, load_config, save_config
from .evaluation import evaluate_loader
from .loop import FitResult, fit, total_training_steps
from .setup import build_optimizer, eval_loader, scanned_split, train_loader


def prepare_training(cfg: RunConfig, stage: StageConfig, accelerator, model, processor, *, prompt: bool,
                     tracker: str, frame_cache=None, train_scan=None) -> SimpleNamespace:
    """Loaders (train + dev), AdamW + schedule for `stage`, everything passed through `accelerator.prepare`,
    the resolved config written to the stage's output folder. `prompt`: batches carry the LLM chat prompt
    (stage 2) or only audio (+ transcript) (stage 1, baselines). Returns the recipe's context."""
    labels = list(model.config.id2label.values())
    train_scan = train_scan or scanned_split(cfg, "train", accelerator)
    dev_scan = scanned_split(cfg, "dev", accelerator)
    stage_no = 2 if prompt else 1
    loader, sampler = train_loader(cfg, train_scan, processor, model.config.label2id, stage=stage_no,
                                   frame_cache=frame_cache)
    steps, _ = total_training_steps(len(loader), cfg.trainer.gradient_accumulation_steps, stage.epochs,
                                    cfg.trainer.max_steps)
    optimizer, scheduler = build_optimizer(model, stage, cfg.trainer.weight_decay, steps, cfg.trainer.warmup_ratio)
    dev = eval_loader(cfg, dev_scan, processor, model.config.label2id, stage=stage_no)
    model, optimizer, loader, scheduler, dev = accelerator.prepare(model, optimizer, loader, scheduler, dev)
    accelerator.init_trackers(tracker)
    if accelerator.is_main_process:
        Path(stage.output_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(stage.output_dir) / "run_config.yaml")
    return SimpleNamespace(cfg=cfg, stage=stage, accelerator=accelerator, model=model, processor=processor,
                           optimizer=optimizer, scheduler=scheduler, loader=loader, sampler=sampler, dev=dev,
                           labels=labels)


def fit_stage(ctx: SimpleNamespace, eval_mode: str, stop_after: int | None = None) -> FitResult:
    """`fit` with the settings of `ctx.cfg.trainer` and `ctx.stage`; dev predictions by `eval_mode`
    ("head": the classifier on the pooled queries / fused vector; "score": LLM label scoring)."""
    cfg, stage, t = ctx.cfg, ctx.stage, ctx.cfg.trainer
    return fit(
        ctx.accelerator, ctx.model, ctx.processor, ctx.optimizer, ctx.scheduler, ctx.loader, ctx.sampler,
        output_dir=stage.output_dir, epochs=stage.epochs, max_steps=t.max_steps,
        evaluate=lambda m: evaluate_loader(ctx.accelerator, m, ctx.processor, ctx.dev, ctx.labels, eval_mode),
        eval_every=t.eval_every, save_every=t.save_every, log_every=t.log_every,
        keep_checkpoints=t.keep_checkpoints, max_grad_norm=t.max_grad_norm,
        resume=t.resume, run_config=cfg, stop_after=stop_after,
    )


def summary(name: str, ctx: SimpleNamespace, result: FitResult) -> str:
    """The line a recipe prints at the end: steps, skipped steps, best dev metric, where the model is."""
    return (f"{name} done: {result.step} steps, {result.skipped_steps} skipped; best dev weighted F1 "
            f"{result.best_metric} at step {result.best_step}; model (from_pretrained): "
            f"{ctx.stage.output_dir}/final/weights")


def recipe_main(doc: str, setup, train, cleanup, argv=None) -> FitResult:
    """`python recipes/X.py --config CFG [key=value ...]` (also what `accelerate launch` runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ctx = setup(load_config(args.config, args.overrides))
    result = train(ctx)
    cleanup(ctx, result)
    return result
