"""Stage 1: pre-train the EmoQ-Former (+ classification and projection heads) with MAL (focal + SupCon).

The speech encoder stays frozen and the LLM is not run (its frozen token table only embeds the
transcript). Optionally the frozen encoder's frames are computed once and cached, so later epochs
skip the encoder entirely.

    emoq run stage1_qformer --config emoq/demo_cpu
    accelerate launch --config_file configs/accelerate/zero2.yaml recipes/stage1_qformer.py --config CONFIG

setup -> train -> cleanup; copy it out with `emoq cp stage1_qformer .` and edit freely.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from emoq.config import RunConfig, load_config, save_config
from emoq.data.collate import EmoQCollator, UtteranceDataset
from emoq.training.evaluation import evaluate_loader
from emoq.training.loop import FitResult, fit, total_training_steps
from emoq.training.setup import (
    build_accelerator,
    build_model_and_processor,
    build_optimizer,
    eval_loader,
    print_parameter_table,
    scanned_split,
    seed_everything,
    train_loader,
)

log = logging.getLogger("emoq.stage1")


@dataclass
class Context:
    cfg: RunConfig
    accelerator: object
    model: object
    processor: object
    optimizer: object
    scheduler: object
    train_loader: object
    sampler: object
    dev_loader: object
    labels: list


def cache_encoder_frames(model, processor, scan, cfg) -> dict[str, torch.Tensor]:
    """Frozen-encoder frames per clip, computed once (valid frames only, so padding never leaks in)."""
    dataset = UtteranceDataset(scan.ok, model.config.label2id, cfg.data.max_seconds, use_transcript=False)
    collate = EmoQCollator(processor, with_prompt=False)
    cache = {}
    model.speech_encoder.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), cfg.trainer.eval_batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + cfg.trainer.eval_batch_size, len(dataset)))])
            frames, mask = model.speech_encoder(batch["input_features"], batch["feature_attention_mask"])
            for key, f, m in zip(batch["keys"], frames, mask):
                cache[key] = f[m].clone()
    return cache


def setup(cfg: RunConfig) -> Context:
    seed_everything(cfg.seed)
    out = cfg.stage1.output_dir
    accelerator = build_accelerator(cfg, out)
    model, processor = build_model_and_processor(cfg)
    # stage 1 trains the EmoQ-Former side only: no LLM, no LoRA, no projector (nothing would train it)
    model.requires_grad_(False)
    for part in (model.qformer, model.classifier, model.contrastive_head):
        part.requires_grad_(True)
    if model.speech_encoder.layer_weights is not None:
        if cfg.stage1.cache_encoder_features:  # cached frames are already mixed: no gradient reaches the mix
            log.warning("stage1.cache_encoder_features: the learned layer mix stays at its initial (uniform) "
                        "weights in stage 1; stage 2, which runs the encoder, learns it")
        else:
            model.speech_encoder.layer_weights.requires_grad_(True)
    if accelerator.is_main_process:
        print_parameter_table(model)
    labels = list(model.config.id2label.values())
    train_scan = scanned_split(cfg, "train", accelerator)
    dev_scan = scanned_split(cfg, "dev", accelerator)
    cache = cache_encoder_frames(model, processor, train_scan, cfg) if cfg.stage1.cache_encoder_features else None
    loader, sampler = train_loader(cfg, train_scan, processor, model.config.label2id, stage=1, frame_cache=cache)
    steps, _ = total_training_steps(len(loader), cfg.trainer.gradient_accumulation_steps, cfg.stage1.epochs,
                                    cfg.trainer.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg.stage1, cfg.trainer.weight_decay, steps, cfg.trainer.warmup_ratio)
    dev = eval_loader(cfg, dev_scan, processor, model.config.label2id, stage=1)
    model, optimizer, loader, scheduler, dev = accelerator.prepare(model, optimizer, loader, scheduler, dev)
    accelerator.init_trackers("stage1")
    if accelerator.is_main_process:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_config(cfg, Path(out) / "run_config.yaml")
    return Context(cfg, accelerator, model, processor, optimizer, scheduler, loader, sampler, dev, labels)


def train(ctx: Context, stop_after: int | None = None) -> FitResult:
    cfg = ctx.cfg
    return fit(
        ctx.accelerator, ctx.model, ctx.processor, ctx.optimizer, ctx.scheduler, ctx.train_loader, ctx.sampler,
        output_dir=cfg.stage1.output_dir, epochs=cfg.stage1.epochs, max_steps=cfg.trainer.max_steps,
        evaluate=lambda m: evaluate_loader(ctx.accelerator, m, ctx.processor, ctx.dev_loader, ctx.labels, "head"),
        eval_every=cfg.trainer.eval_every, save_every=cfg.trainer.save_every, log_every=cfg.trainer.log_every,
        keep_checkpoints=cfg.trainer.keep_checkpoints, max_grad_norm=cfg.trainer.max_grad_norm,
        resume=cfg.trainer.resume, run_config=cfg, stop_after=stop_after,
    )


def cleanup(ctx: Context, result: FitResult) -> None:
    ctx.accelerator.end_training()
    if ctx.accelerator.is_main_process:
        print(f"stage 1 done: {result.step} steps, {result.skipped_steps} skipped; best dev weighted F1 "
              f"{result.best_metric} at step {result.best_step}; model: {ctx.cfg.stage1.output_dir}/final/weights")


def main(argv=None) -> FitResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ctx = setup(load_config(args.config, args.overrides))
    result = train(ctx)
    cleanup(ctx, result)
    return result


if __name__ == "__main__":
    main()
