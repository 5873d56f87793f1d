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
from accelerate.utils import DistributedType, gather_object, send_to_device

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
    # a streamed split (data.streaming) repeats without end and has no length: max_steps counts the run, and
    # its position, not a batch count, says where to resume
    stream = train_loader.dataset if isinstance(train_loader.dataset, torch.utils.data.IterableDataset) else None
    if stream is not None:
        total = steps_per_epoch = max_steps
    else:
        total, steps_per_epoch = total_training_steps(len(train_loader), accum, epochs, max_steps)
    result = FitResult(step=0)
    ckpt = latest_checkpoint(output_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt / "state"))
        state = read_trainer_state(ckpt)
        result = FitResult(**{k: state[k] for k in FitResult.__dataclass_fields__ if k in state})
        if stream is not None:
            stream.load_state_dict(state["stream_positions"][accelerator.process_index])
        accelerator.print(f"resumed from {ckpt} at step {result.step}")
    save_every = save_every or steps_per_epoch
    eval_every = eval_every or steps_per_epoch

    def checkpoint(name: str, with_state: bool = True):
        state = {**result.__dict__, "total_steps": total, "steps_per_epoch": steps_per_epoch,
                 "num_processes": accelerator.num_processes,
                 "parameter_dtypes": parameter_dtypes(accelerator.unwrap_model(model))}
        if stream is not None:  # every rank's position (a collective: every rank gets here)
            state["stream_positions"] = gather_object([stream.state_dict()])
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
    checked_gradients = False
    while result.step < total:
        epoch, done_in_epoch = divmod(result.step, steps_per_epoch)
        sampler.set_epoch(epoch) if hasattr(sampler, "set_epoch") else None
        if stream is not None:
            loader = (send_to_device(batch, accelerator.device) for batch in train_loader)
        elif done_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, done_in_epoch * accum)
        else:
            loader = train_loader
        window: list[float] = []
        window_finite = True
        step_at_epoch_start = result.step
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**model_inputs(batch))
                # every rank runs backward, whatever its loss: a rank that skipped it would leave DDP's reducer
                # and DeepSpeed's micro-step count behind the others; a non-finite window is dropped below
                accelerator.backward(out.loss)
                losses = accelerator.gather(out.loss.detach().float().reshape(1))
                if not torch.isfinite(losses).all():
                    window_finite = False
                    log.warning("step %d: non-finite loss on some rank (batch %s on this one)", result.step + 1,
                                batch.get("keys"))
                window += [v for v in losses.tolist() if math.isfinite(v)]
                if accelerator.sync_gradients:
                    if not checked_gradients:
                        _check_every_trainable_parameter_has_a_gradient(accelerator, model)
                        checked_gradients = True
                    if _apply_or_skip(accelerator, model, optimizer, max_grad_norm, window_finite):
                        scheduler.step()
                    else:
                        result.skipped_steps += 1
                        log.warning("step %d: non-finite loss or gradient; the optimiser step is skipped on every "
                                    "rank", result.step + 1)
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            result.step += 1
            result.losses.append(sum(window) / len(window) if window else float("nan"))
            window, window_finite = [], True
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
        if result.step == step_at_epoch_start:  # never spin: a pass over the data must make progress
            raise RuntimeError(f"a pass over the training data made no optimiser step at step {result.step} (the "
                               f"loader yields fewer batches than its length, {len(train_loader)}, says)")
    progress.close()
    checkpoint("final", with_state=False)
    return result


def parameter_dtypes(model) -> dict[str, dict[str, list[str]]]:
    """{top-level module: {"trainable" | "frozen": [dtypes]}}, as training holds them (after DeepSpeed or DDP
    took the model): the record that shows which precision each part really trained in."""
    found: dict[str, dict[str, set]] = {}
    for name, p in model.named_parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        found.setdefault(name.split(".", 1)[0], {}).setdefault(kind, set()).add(str(p.dtype).removeprefix("torch."))
    return {part: {kind: sorted(dtypes) for kind, dtypes in kinds.items()} for part, kinds in found.items()}


def _apply_or_skip(accelerator, model, optimizer, max_grad_norm: float, window_finite: bool) -> bool:
    """At an accumulation boundary: clip and step, or skip the step when the window's loss (on any rank) or the
    gradient norm is not finite. Returns whether the step was applied.

    Every rank reaches the same decision without a further collective: `window_finite` comes from gathered
    losses, and the gradient norm is computed from gradients already reduced over the ranks. Under DeepSpeed
    the engine has already stepped inside `backward`; it skips a step whose gradient norm is not finite
    itself, and accelerate reports that as `step_was_skipped`.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return not optimizer.step_was_skipped
    # max_norm=inf measures without clipping
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf)
    if not window_finite or (norm is not None and not torch.isfinite(torch.as_tensor(norm)).all()):
        return False
    optimizer.step()
    return True


def _check_every_trainable_parameter_has_a_gradient(accelerator, model) -> None:
    """After the first backward: a trainable parameter the loss never reached is a configuration mistake, and
    under DDP a fatal one (the gradient reduction waits for it and fails at the next step with an error that
    names no parameter). Names them instead. DeepSpeed keeps gradients in its own buffers: not checked there."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    missing = [name for name, p in accelerator.unwrap_model(model).named_parameters()
               if p.requires_grad and p.grad is None]
    if not missing:
        return
    message = (f"{len(missing)} trainable parameters received no gradient from the loss: {missing[:8]}; freeze "
               "them (requires_grad_(False)) or give the loss a term that uses them")
    if accelerator.num_processes > 1:
        raise RuntimeError(message)
    log.warning(message)


def _progress(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_local_main_process, desc="train", unit="step")
