"""Train a published baseline — Qieemo or Patamia et al. 2023 (`model.system`) — the way EmoQ is trained.

Same data, collator, MAL loss (focal + SupCon, `loss:` section), optimiser, loop, checkpoints, resume,
dev selection by weighted F1 and `emoq eval` as EmoQ's stage 1, so the numbers compare. The baselines
are single-stage: this recipe reads the `stage1:` section (epochs, learning rate, output folder).
The pretrained encoders stay frozen unless `model.freeze_encoder: false`.

    emoq run train_baseline --config qieemo/demo_cpu data.root=demo_out/corpus
    accelerate launch --config_file configs/accelerate/ddp.yaml recipes/train_baseline.py --config CONFIG

setup -> train -> cleanup; copy it out with `emoq cp train_baseline .` and edit freely.
"""

from __future__ import annotations

from types import SimpleNamespace

from emoq.config import RunConfig
from emoq.training.loop import FitResult
from emoq.training.recipe import fit_stage, prepare_training, recipe_main, summary
from emoq.training.setup import build_accelerator, build_baseline, print_parameter_table, seed_everything


def setup(cfg: RunConfig) -> SimpleNamespace:
    if cfg.stage1.cache_encoder_features:
        raise SystemExit("train_baseline: stage1.cache_encoder_features is EmoQ's; the baselines run their "
                         "encoders live (Qieemo reads two of its layers) — set it to false")
    seed_everything(cfg.seed)
    accelerator = build_accelerator(cfg, cfg.stage1.output_dir)
    model, processor = build_baseline(cfg)  # pretrained encoders frozen (model.freeze_encoder), the rest trains
    if accelerator.is_main_process:
        print_parameter_table(model)
    return prepare_training(cfg, cfg.stage1, accelerator, model, processor, prompt=False,
                            tracker=f"baseline_{cfg.model.system}")


def train(ctx: SimpleNamespace, stop_after: int | None = None) -> FitResult:
    return fit_stage(ctx, "head", stop_after)  # dev: the classifier on the fused vector


def cleanup(ctx: SimpleNamespace, result: FitResult) -> None:
    ctx.accelerator.end_training()
    if ctx.accelerator.is_main_process:
        print(summary(ctx.cfg.model.system, ctx, result))


def main(argv=None) -> FitResult:
    return recipe_main(__doc__, setup, train, cleanup, argv)


if __name__ == "__main__":
    main()
