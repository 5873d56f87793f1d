"""The optimisation loop both stages share: accumulation, clipping, NaN skipping, eval, checkpoints, resume.

Kept in the library (not copied into each recipe) because stage 1 and stage 2 differ only in what the
recipe builds around it — the model's trainable parts, the batches, and how dev predictions are made —
and two copies of the same loop would drift. Recipes stay `setup -> fit -> cleanup`.

Resume is exact: the state folder restores optimiser, scheduler and RNG; the sampler's epoch is set
from the step; `skip_first_batches` skips the batches of the interrupted epoch already seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, prune_checkpoints, read_trainer_state, save_checkpoint

log = logging.getLogger("emoq.training")

MODEL_INPUTS = (
    "input_features", "feature_attention_mask", "input_ids", "attention_mask", "labels", "emotion_labels",
    "transcript_ids", "transcript_attention_mask", "encoder_frames", "encoder_frame_mask",
    "text_input_ids", "text_attention_mask",  # the Patamia baseline's text-encoder ids
)


@dataclass
class FitResult:
    step: int
    losses: list[float] = field(default_factory=list)  # one per optimiser step (mean over accumulation)
    skipped_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def total_training_steps(num_batches: int, accumulation: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(total optimiser steps, steps per epoch); `max_steps > 0` wins over `epochs`."""
    per_epoch = max(1, math.ceil(num_batches / accumulation))
    return (max_steps if max_steps > 0 else max(1, math.ceil(epochs * per_epoch))), per_epoch


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def fit(
    accelerator,
    model,
    processor,
    optimizer,
    scheduler,
    train_loader,
    sampler,
    *,
    output_dir: str | Path,
    epochs: float,
    max_steps: int,
    evaluate: Callable[[object], dict] | None = None,
    eval_every: int = 0,
    save_every: int = 0,
    log_every: int = 10,
    keep_checkpoints: int = 2,
    max_grad_norm: float = 1.0,
    resume: bool = True,
    run_config=None,
    metric: str = "weighted_f1",
    stop_after: int | None = None,
) -> FitResult:
    """Train until `max_steps` (if > 0) or `epochs`; returns losses and the best dev metric.

    `stop_after`: stop (as if interrupted) after this many optimiser steps — used by resume tests.
    """
    output_dir = Path(output_dir)
    accum = accelerator.gradient_accumulation_steps
    total, steps_per_epoch = total_training_steps(len(train_loader), accum, epochs, max_steps)
    result = FitResult(step=0)
    ckpt = latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt / "state"))
        state = read_trainer_state(ckpt)
        result = FitResult(**{k: state[k] for k in FitResult.__dataclass_fields__ if k in state})
        accelerator.print(f"resumed from {ckpt} at step {result.step}")
    save_every = save_every or steps_per_epoch
    eval_every = eval_every or steps_per_epoch

    def checkpoint(name: str, with_state: bool = True):
        state = {**result.__dict__, "total_steps": total, "steps_per_epoch": steps_per_epoch}
        save_checkpoint(accelerator, model, processor, output_dir / name, state, run_config, with_state=with_state)

    def maybe_eval():
        if evaluate is None:
            return
        metrics = evaluate(model)
        model.train()
        value = metrics.get(metric)
        result.history.append({"step": result.step, **{k: v for k, v in metrics.items() if isinstance(v, float)}})
        accelerator.log({f"dev/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=result.step)
        accelerator.print(f"step {result.step}: dev {metric} = {value:.4f}")
        if value is not None and (result.best_metric is None or value > result.best_metric):
            result.best_metric, result.best_step = value, result.step
            checkpoint("best", with_state=False)

    model.train()
    progress = _progress(accelerator, total, result.step)
    while result.step < total:
        epoch, done_in_epoch = divmod(result.step, steps_per_epoch)
        sampler.set_epoch(epoch) if hasattr(sampler, "set_epoch") else None
        loader = accelerator.skip_first_batches(train_loader, done_in_epoch * accum) if done_in_epoch else train_loader
        window: list[float] = []
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**model_inputs(batch))
                loss = out.loss
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0
                if not finite:  # every rank skips together, so no rank waits in a collective alone
                    result.skipped_steps += 1
                    log.warning("step %d: non-finite loss, batch %s skipped", result.step, batch.get("keys"))
                    optimizer.zero_grad()
                    continue
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            window.append(float(accelerator.gather(loss.detach().reshape(1)).mean()))
            if not accelerator.sync_gradients:
                continue
            result.step += 1
            result.losses.append(sum(window) / len(window))
            window = []
            progress.update(1)
            if result.step % log_every == 0 or result.step == total:
                logs = {"train/loss": result.losses[-1], "train/lr": scheduler.get_last_lr()[0]}
                for name in ("lm_loss", "focal_loss", "supcon_loss"):
                    if getattr(out, name, None) is not None:
                        logs[f"train/{name}"] = float(getattr(out, name).detach())
                accelerator.log(logs, step=result.step)
                progress.set_postfix(loss=f"{result.losses[-1]:.4f}")
            if result.step % eval_every == 0 or result.step == total:
                maybe_eval()
            if result.step % save_every == 0 and result.step < total:
                checkpoint(f"checkpoint-{result.step}")
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, keep_checkpoints)
            if result.step >= total or (stop_after is not None and result.step >= stop_after):
                break
        if stop_after is not None and result.step >= stop_after:
            progress.close()
            return result
    progress.close()
    checkpoint("final", with_state=False)
    return result


def _progress(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="train", unit="step")
