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

import logging
from pathlib import Path
from types import SimpleNamespace

from emoq.config import RunConfig
from emoq.training.loop import FitResult
from emoq.training.recipe import fit_stage, prepare_training, recipe_main, summary
from emoq.training.setup import (
    build_accelerator,
    build_model_and_processor,
    print_parameter_table,
    seed_everything,
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
    return prepare_training(cfg, cfg.stage2, accelerator, model, processor, prompt=True, tracker="stage2")


def train(ctx: SimpleNamespace, stop_after: int | None = None) -> FitResult:
    return fit_stage(ctx, "score", stop_after)  # dev: label scoring under the LLM, no free generation


def cleanup(ctx: SimpleNamespace, result: FitResult) -> None:
    ctx.accelerator.end_training()
    if ctx.accelerator.is_main_process:
        print(summary("stage 2", ctx, result))


def main(argv=None) -> FitResult:
    return recipe_main(__doc__, setup, train, cleanup, argv)


if __name__ == "__main__":
    main()
