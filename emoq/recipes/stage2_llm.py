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

import torch

from emoq.config import RunConfig
from emoq.training.builders import build_model_and_processor
from emoq.training.loop import model_inputs
from emoq.training.recipe import Built, Recipe

log = logging.getLogger("emoq.stage2")


class Stage2LLM(Recipe):
    name = "stage2"
    prompt = True  # the chat prompt with the soft prompts in it, the label word as the LM target

    def stage_config(self, cfg: RunConfig):
        return cfg.stage2

    def build(self, cfg: RunConfig, accelerator) -> Built:
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
        for p in model.adapter_parameters():
            p.requires_grad_(True)
        if model.speech_encoder.layer_weights is not None:
            model.speech_encoder.layer_weights.requires_grad_(True)
        return Built(model, processor)

    @torch.no_grad()
    def predict_dev(self, model, processor, batch: dict) -> torch.Tensor:
        """Label scoring under the LLM (the log-likelihood of each label's answer), no free generation."""
        inputs = model_inputs(batch)
        scores = model.score_labels(
            inputs["input_ids"], inputs["attention_mask"], inputs["input_features"], processor.label_candidates(),
            inputs.get("feature_attention_mask"), inputs.get("transcript_ids"), inputs.get("transcript_attention_mask"),
        )
        return scores.argmax(-1)


RECIPE = Stage2LLM()

if __name__ == "__main__":
    RECIPE.main(description=__doc__.splitlines()[0])
