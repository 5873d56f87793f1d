"""Stage 1's cache of frozen-encoder frames: computed once, sharded over the ranks, stored on disk, read lazily.

At paper scale the frames do not fit in memory (MELD's training set through Whisper-large-v3 is tens of
GB), and encoding the whole set on every rank wastes all but one rank's time. So each rank encodes its
own share of the clips (`clips[rank::world]`, in key order) into its own safetensors file, and every rank
then reads any clip's frames from those files on demand: safetensors maps the file and copies out only
the tensor asked for, so memory holds a batch, not the corpus.

The files are kept in the stage's output folder with a fingerprint (encoder, dtype, layers, clip files,
number of shards): a resumed or repeated run with the same inputs skips the encoder entirely; anything
else rebuilds the cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..audio import source_fingerprint
from ..data.collate import EmoQCollator, UtteranceDataset
from ..files import atomic_path

log = logging.getLogger("emoq.training")

CACHE_FOLDER = "encoder_frames"


class EncoderFrameCache(Mapping):
    """clip key -> frames [T, H], read from the shard files on access (never all in memory).

    Each process opens the files itself on first use, so the mapping can be handed to DataLoader workers."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self._file_of: dict[str, int] = {}
        for i, path in enumerate(self.files):
            with safe_open(path, "pt") as f:
                self._file_of.update(dict.fromkeys(f.keys(), i))
        self._handles: dict[int, list] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        handles = self._handles.get(os.getpid())
        if handles is None:  # first access in this process (or a forked worker)
            handles = self._handles[os.getpid()] = [safe_open(path, "pt") for path in self.files]
        return handles[self._file_of[key]].get_tensor(key)

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


def shard_files(folder: Path, world: int) -> list[Path]:
    return [folder / f"shard-{rank:05d}-of-{world:05d}.safetensors" for rank in range(world)]


def cache_encoder_frames(model, processor, scan, cfg, accelerator) -> EncoderFrameCache:
    """Encode this rank's share of the clips (valid frames only, so padding never leaks in) unless its shard
    already holds them, wait for the other ranks, and return the cache over every shard."""
    folder = Path(cfg.stage1.output_dir) / CACHE_FOLDER
    world, rank = accelerator.num_processes, accelerator.process_index
    encoder = model.speech_encoder
    clips = sorted(scan.ok, key=lambda u: u.key)
    fingerprint = json.dumps({
        "encoder": cfg.model.encoder, "seed": cfg.seed if cfg.model.tiny_random else None,
        "config": encoder.config.to_json_string(), "dtype": str(next(encoder.parameters()).dtype),
        "layers": cfg.model.encoder_layers, "max_seconds": cfg.data.max_seconds, "shards": world,
        "clips": [(u.key, *source_fingerprint(u.audio)) for u in clips],
    }, sort_keys=True)
    files = shard_files(folder, world)
    if _stored_fingerprint(files[rank]) != fingerprint:
        _encode_shard(model, processor, clips[rank::world], cfg, accelerator, files[rank], fingerprint)
    accelerator.wait_for_everyone()
    stale = [f.name for f in files if _stored_fingerprint(f) != fingerprint]
    if stale:
        raise RuntimeError(f"{folder}: shards {stale} were not written for this run's clips and encoder")
    return EncoderFrameCache(files)


def _encode_shard(model, processor, clips, cfg, accelerator, path: Path, fingerprint: str) -> None:
    encoder = model.speech_encoder
    dataset = UtteranceDataset(clips, model.config.label2id, cfg.data.max_seconds, use_transcript=False)
    collate = EmoQCollator(processor, with_prompt=False)
    frames_by_key = {}
    encoder.to(accelerator.device).eval()
    batch_size = cfg.trainer.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            frames, mask = encoder(batch["input_features"].to(accelerator.device),
                                   batch["feature_attention_mask"].to(accelerator.device))
            for key, f, m in zip(batch["keys"], frames, mask):
                frames_by_key[key] = f[m].cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a killed run never leaves a half-written shard behind
        save_file(frames_by_key, tmp, metadata={"fingerprint": fingerprint})
    log.info("rank %d: encoder frames of %d clips cached in %s", accelerator.process_index, len(frames_by_key), path)


def _stored_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fingerprint")
