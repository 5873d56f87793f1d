"""What every recipe shares once its model is built: data, optimiser, `accelerator.prepare`, the loop, dev
evaluation and the command-line `main` (torchtune habit: a recipe is a class with `setup -> train ->
cleanup`, and its state is typed).

What makes a recipe a recipe stays in its own file, as a subclass: which model it builds and which parts
train (`build`), which stage section of the config it reads (`stage_config`), whether its batches carry
the LLM chat prompt (`prompt`), and how it predicts a dev batch's classes (`predict_dev`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import RunConfig, StageConfig, load_config, save_config
from ..data.collate import ScanResult
from ..evaluation.metrics import compute_metrics
from .builders import (
    build_optimizer,
    eval_loader,
    print_parameter_table,
    scanned_split,
    stream_loader,
    train_loader,
)
from .loop import FitResult, fit, model_inputs, total_training_steps
from .runtime import build_accelerator, loading_pretrained_weights, seed_everything

log = logging.getLogger("emoq.training")


@dataclass
class Built:
    """What a recipe's `build` returns: the model with its trainable parts set, its processor, and — when the
    recipe already read the training split (to cache encoder frames) — that split and the frames."""

    model: torch.nn.Module
    processor: object
    train_scan: ScanResult | None = None
    frame_cache: Mapping | None = None


@dataclass
class RecipeState:
    """Everything `setup` builds and `train` / `cleanup` use."""

    cfg: RunConfig
    stage: StageConfig
    accelerator: object
    model: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: torch.utils.data.DataLoader
    sampler: object
    dev: torch.utils.data.DataLoader
    labels: list[str]


def freeze_outside_loss(model, loss, with_llm: bool) -> None:
    """Freeze the parts the configured loss never reaches (`model.modules_outside_loss`): a trainable parameter
    without a gradient would stop a DDP run at its second step and only waste optimiser state elsewhere.
    `with_llm`: the LLM runs (stage 2), so its token loss is part of the loss."""
    if not with_llm:
        loss = dataclasses.replace(loss, lm_weight=0.0)
    for part, params in model.modules_outside_loss(loss).items():
        if any(p.requires_grad for p in params):
            log.info("%s: frozen, the loss never reaches it (%s)", part, _loss_summary(loss))
            for p in params:
                p.requires_grad_(False)


def _loss_summary(loss) -> str:
    return f"focal_weight={loss.focal_weight}, supcon_weight={loss.supcon_weight}, lm_weight={loss.lm_weight}"


class Recipe:
    """setup -> train -> cleanup. Subclasses say what they build; the rest is shared."""

    #: how the recipe names itself in logs, the TensorBoard run and its summary line
    name: str = "recipe"
    #: batches carry the LLM chat prompt (and the answer as LM labels when training): EmoQ's stage 2
    prompt: bool = False

    # ------------------------------------------------------------------ what subclasses decide

    def stage_config(self, cfg: RunConfig) -> StageConfig:
        """The config section with this recipe's epochs, learning rates and output folder."""
        return cfg.stage1

    def build(self, cfg: RunConfig, accelerator) -> Built:
        raise NotImplementedError

    @torch.no_grad()
    def predict_dev(self, model, processor, batch: dict) -> torch.Tensor:
        """Class ids of a dev batch; by default the classifier head (EmoQ-Former's pooled queries, or a
        baseline's fused vector)."""
        inputs = {k: v for k, v in model_inputs(batch).items()
                  if k not in ("labels", "emotion_labels", "input_ids", "attention_mask")}
        return model(**inputs).emotion_logits.argmax(-1)

    # ------------------------------------------------------------------ shared

    def setup(self, cfg: RunConfig) -> RecipeState:
        seed_everything(cfg.seed)
        stage = self.stage_config(cfg)
        accelerator = build_accelerator(cfg, stage.output_dir)
        with loading_pretrained_weights(accelerator):
            built = self.build(cfg, accelerator)
        model, processor = built.model, built.processor
        freeze_outside_loss(model, cfg.loss, with_llm=self.prompt)
        if accelerator.is_main_process:
            print_parameter_table(model)
        labels = list(model.config.id2label.values())
        dev_scan = scanned_split(cfg, "dev", accelerator)
        if cfg.data.streaming:  # each rank reads its own part of the stream: the loader is not sharded again
            loader, sampler = stream_loader(cfg, processor, model.config.label2id, self.prompt, accelerator)
            steps = cfg.trainer.max_steps
        else:
            train_scan = built.train_scan or scanned_split(cfg, "train", accelerator)
            loader, sampler = train_loader(cfg, train_scan, processor, model.config.label2id, self.prompt,
                                           frame_cache=built.frame_cache)
            steps, _ = total_training_steps(len(loader), cfg.trainer.gradient_accumulation_steps, stage.epochs,
                                            cfg.trainer.max_steps)
        optimizer, scheduler = build_optimizer(model, stage, cfg.trainer.weight_decay, steps,
                                               cfg.trainer.warmup_ratio)
        dev = eval_loader(cfg, dev_scan, processor, model.config.label2id, self.prompt)
        if cfg.data.streaming:
            model, optimizer, scheduler, dev = accelerator.prepare(model, optimizer, scheduler, dev)
        else:
            model, optimizer, loader, scheduler, dev = accelerator.prepare(model, optimizer, loader, scheduler, dev)
        accelerator.init_trackers(self.name)
        if accelerator.is_main_process:
            Path(stage.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(stage.output_dir) / "run_config.yaml")
        return RecipeState(cfg=cfg, stage=stage, accelerator=accelerator, model=model, processor=processor,
                           optimizer=optimizer, scheduler=scheduler, loader=loader, sampler=sampler, dev=dev,
                           labels=labels)

    def evaluate(self, state: RecipeState, model) -> dict:
        """Dev metrics: batches sharded across processes, predictions gathered, scored once."""
        model.eval()
        unwrapped = state.accelerator.unwrap_model(model)
        golds, preds = [], []
        for batch in state.dev:
            pred = self.predict_dev(unwrapped, state.processor, batch)
            pred, gold = state.accelerator.gather_for_metrics((pred, batch["emotion_labels"].to(pred.device)))
            preds += pred.tolist()
            golds += gold.tolist()
        return compute_metrics([state.labels[i] for i in golds], [state.labels[i] for i in preds], state.labels)

    def train(self, state: RecipeState, stop_after: int | None = None) -> FitResult:
        """`fit` with the settings of the config's `trainer:` and stage sections. `stop_after`: stop (as if
        interrupted) after this many optimiser steps."""
        t = state.cfg.trainer
        return fit(
            state.accelerator, state.model, state.processor, state.optimizer, state.scheduler, state.loader,
            state.sampler, output_dir=state.stage.output_dir, epochs=state.stage.epochs, max_steps=t.max_steps,
            evaluate=lambda model: self.evaluate(state, model),
            eval_every=t.eval_every, save_every=t.save_every, log_every=t.log_every,
            keep_checkpoints=t.keep_checkpoints, max_grad_norm=t.max_grad_norm,
            resume=t.resume, run_config=state.cfg, stop_after=stop_after,
        )

    def cleanup(self, state: RecipeState, result: FitResult) -> None:
        state.accelerator.end_training()
        if state.accelerator.is_main_process:
            print(f"{self.name} done: {result.step} steps, {result.skipped_steps} skipped; best dev weighted F1 "
                  f"{result.best_metric} at step {result.best_step}; model (from_pretrained): "
                  f"{state.stage.output_dir}/best/weights (dev-selected; the last step: final/weights)")

    def main(self, argv=None, description: str | None = None) -> FitResult:
        """`python recipes/X.py --config CFG [key=value ...]` (also what `accelerate launch` runs)."""
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--config", required=True)
        parser.add_argument("overrides", nargs="*")
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        state = self.setup(load_config(args.config, args.overrides))
        result = self.train(state)
        self.cleanup(state, result)
        return result
