"""Stage 2: LoRA (or QLoRA) fine-tuning of the LLM with the EmoQ-Former's queries as soft prompts.

Starts from the stage-1 folder (`stage2.init_from`), injects the query states in place of the
`<|emoq|>` placeholders and trains on the chat target (the emotion word) with the LLM's token loss
plus MAL (focal + SupCon on the EmoQ-Former heads). Dev selection uses label scoring: the
log-likelihood of each label answer, no free generation.

    emoq run stage2_llm --config emoq/demo_cpu
    accelerate launch --config_file configs/accelerate/zero2.yaml recipes/stage2_llm.py --config CONFIG

setup -> train -> cleanup; copy it out with `emoq cp stage2_llm .` and edit freely.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from types import SimpleNamespace

from emoq.config import RunConfig, load_config, save_config
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

log = logging.getLogger("emoq.stage2")


def setup(cfg: RunConfig) -> SimpleNamespace:
    seed_everything(cfg.seed)
    out = Path(cfg.stage2.output_dir)
    accelerator = build_accelerator(cfg, str(out))
    init_from = cfg.stage2.init_from
    if init_from is not None:
        init_from = Path(init_from) / "weights"
        if not (init_from / "config.json").is_file():
            raise SystemExit(
                f"stage2.init_from: {init_from} holds no stage-1 model; run stage1_qformer first "
                "or pass stage2.init_from=null to start from an untrained EmoQ-Former"
            )
    else:
        log.warning("stage2.init_from is null: the EmoQ-Former starts untrained")
    model, processor = build_model_and_processor(cfg, init_from=str(init_from) if init_from else None)
    # trainable: LoRA in the LLM, the EmoQ-Former side and the projector; never the encoder or base LLM
    model.requires_grad_(False)
    for part in (model.qformer, model.classifier, model.contrastive_head, model.projector):
        part.requires_grad_(True)
    for name, p in model.language_model.named_parameters():
        p.requires_grad_("lora_" in name)
    if model.speech_encoder.layer_weights is not None:
        model.speech_encoder.layer_weights.requires_grad_(True)
    if accelerator.is_main_process:
        print_parameter_table(model)
    labels = list(model.config.id2label.values())
    train_scan, dev_scan = scanned_split(cfg, "train", accelerator), scanned_split(cfg, "dev", accelerator)
    loader, sampler = train_loader(cfg, train_scan, processor, model.config.label2id, stage=2)
    steps, _ = total_training_steps(len(loader), cfg.trainer.gradient_accumulation_steps, cfg.stage2.epochs,
                                    cfg.trainer.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg.stage2, cfg.trainer.weight_decay, steps, cfg.trainer.warmup_ratio)
    dev = eval_loader(cfg, dev_scan, processor, model.config.label2id, stage=2)
    model, optimizer, loader, scheduler, dev = accelerator.prepare(model, optimizer, loader, scheduler, dev)
    accelerator.init_trackers("stage2")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "run_config.yaml")
    return SimpleNamespace(cfg=cfg, accelerator=accelerator, model=model, processor=processor, optimizer=optimizer,
                           scheduler=scheduler, loader=loader, sampler=sampler, dev=dev, labels=labels)


def train(ctx, stop_after: int | None = None) -> FitResult:
    cfg = ctx.cfg
    return fit(
        ctx.accelerator, ctx.model, ctx.processor, ctx.optimizer, ctx.scheduler, ctx.loader, ctx.sampler,
        output_dir=cfg.stage2.output_dir, epochs=cfg.stage2.epochs, max_steps=cfg.trainer.max_steps,
        evaluate=lambda m: evaluate_loader(ctx.accelerator, m, ctx.processor, ctx.dev, ctx.labels, "score"),
        eval_every=cfg.trainer.eval_every, save_every=cfg.trainer.save_every, log_every=cfg.trainer.log_every,
        keep_checkpoints=cfg.trainer.keep_checkpoints, max_grad_norm=cfg.trainer.max_grad_norm,
        resume=cfg.trainer.resume, run_config=cfg, stop_after=stop_after,
    )


def cleanup(ctx, result: FitResult) -> None:
    ctx.accelerator.end_training()
    if ctx.accelerator.is_main_process:
        print(f"stage 2 done: {result.step} steps, {result.skipped_steps} skipped; best dev weighted F1 "
              f"{result.best_metric} at step {result.best_step}; model (from_pretrained): "
              f"{ctx.cfg.stage2.output_dir}/final/weights")


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
