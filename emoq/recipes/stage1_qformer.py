"""Stage 1: pre-train the EmoQ-Former (+ classification and projection heads) with MAL (focal + SupCon).

The speech encoder stays frozen and the LLM is not run (its frozen token table only embeds the
transcript). Optionally (`stage1.cache_encoder_features`) the frozen encoder's frames are computed once
and cached on disk, so later epochs (and reruns) skip the encoder entirely.

    emoq run stage1_qformer --config emoq/demo_cpu
    accelerate launch --config_file configs/accelerate/zero2.yaml recipes/stage1_qformer.py --config CONFIG

setup -> train -> cleanup; copy it out with `emoq cp stage1_qformer .` and edit freely.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from emoq.config import RunConfig
from emoq.data.collate import EmoQCollator, UtteranceDataset
from emoq.files import atomic_path
from emoq.training.builders import build_model_and_processor, scanned_split
from emoq.training.recipe import Built, Recipe

log = logging.getLogger("emoq.stage1")


def cache_encoder_frames(model, processor, scan, cfg, accelerator) -> dict[str, torch.Tensor]:
    """Frozen-encoder frames per clip (valid frames only, so padding never leaks in), computed once and
    kept on disk in the stage's output folder, so later epochs — and a resumed or repeated run with the
    same encoder, dtype, layers and clips — skip the encoder. A rank that finds no valid file computes
    the frames itself (no rank waits at a barrier through a long encoder pass: that would hit the
    process-group timeout); the main process stores them, atomically."""
    path = Path(cfg.stage1.output_dir) / "encoder_frames.safetensors"
    encoder = model.speech_encoder
    fingerprint = json.dumps({
        "encoder": cfg.model.encoder, "seed": cfg.seed if cfg.model.tiny_random else None,
        "config": encoder.config.to_json_string(), "dtype": str(next(encoder.parameters()).dtype),
        "layers": cfg.model.encoder_layers, "max_seconds": cfg.data.max_seconds,
        "clips": sorted((u.key, str(u.audio), os.path.getsize(u.audio), os.path.getmtime(u.audio)) for u in scan.ok),
    }, sort_keys=True)
    if _stored_fingerprint(path) == fingerprint:
        return load_file(path)
    dataset = UtteranceDataset(scan.ok, model.config.label2id, cfg.data.max_seconds, use_transcript=False)
    collate = EmoQCollator(processor, with_prompt=False)
    frames_by_key = {}
    encoder.to(accelerator.device).eval()
    with torch.no_grad():
        for start in range(0, len(dataset), cfg.trainer.eval_batch_size):
            stop = min(start + cfg.trainer.eval_batch_size, len(dataset))
            batch = collate([dataset[i] for i in range(start, stop)])
            frames, mask = encoder(batch["input_features"].to(accelerator.device),
                                   batch["feature_attention_mask"].to(accelerator.device))
            for key, f, m in zip(batch["keys"], frames, mask):
                frames_by_key[key] = f[m].cpu().contiguous()
    if accelerator.is_main_process:
        with atomic_path(path) as tmp:  # a killed run never leaves a half-written cache behind
            save_file(frames_by_key, tmp, metadata={"fingerprint": fingerprint})
        log.info("encoder frames of %d clips cached in %s", len(frames_by_key), path)
    return frames_by_key


def _stored_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fingerprint")


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
