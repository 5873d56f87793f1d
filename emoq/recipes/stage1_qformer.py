"""Stage 1: pre-train the EmoQ-Former (+ classification and projection heads) with MAL (focal + SupCon).

The speech encoder stays frozen and the LLM is not run (its frozen token table only embeds the
transcript). Optionally (`stage1.cache_encoder_features`) the frozen encoder's frames are computed once,
each rank encoding its share, and cached on disk (`emoq.training.frame_cache`), so later epochs (and
reruns) skip the encoder entirely.

    emoq run stage1_qformer --config emoq/demo_cpu
    accelerate launch --config_file configs/accelerate/zero2.yaml recipes/stage1_qformer.py --config CONFIG

setup -> train -> cleanup; copy it out with `emoq cp stage1_qformer .` and edit freely.
"""

from __future__ import annotations

import logging

from emoq.config import RunConfig
from emoq.training.builders import build_model_and_processor, scanned_split
from emoq.training.frame_cache import cache_encoder_frames
from emoq.training.recipe import Built, Recipe

log = logging.getLogger("emoq.stage1")


class Stage1QFormer(Recipe):
    name = "stage1"
    prompt = False  # audio (+ transcript) only: the LLM does not run

    def build(self, cfg: RunConfig, accelerator) -> Built:
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
        if not cfg.stage1.cache_encoder_features:
            return Built(model, processor)
        train_scan = scanned_split(cfg, "train", accelerator)
        return Built(model, processor, train_scan,
                     cache_encoder_frames(model, processor, train_scan, cfg, accelerator))


RECIPE = Stage1QFormer()

if __name__ == "__main__":
    RECIPE.main(description=__doc__.splitlines()[0])
