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

from emoq.config import RunConfig
from emoq.training.builders import build_baseline
from emoq.training.recipe import Built, Recipe, RecipeState


class TrainBaseline(Recipe):
    prompt = False  # classifiers: audio (+ transcript for Patamia), no chat prompt

    def setup(self, cfg: RunConfig) -> RecipeState:
        if cfg.stage1.cache_encoder_features:
            raise SystemExit("train_baseline: stage1.cache_encoder_features is EmoQ's; the baselines run their "
                             "encoders live (Qieemo reads two of its layers) — set it to false")
        self.name = f"baseline_{cfg.model.system}"
        return super().setup(cfg)

    def build(self, cfg: RunConfig, accelerator) -> Built:
        return Built(*build_baseline(cfg))  # pretrained encoders frozen (model.freeze_encoder), the rest trains


RECIPE = TrainBaseline()

if __name__ == "__main__":
    RECIPE.main(description=__doc__.splitlines()[0])
