"""Where a run executes: seeding and the accelerator (DDP, DeepSpeed, CPU gloo), set up the same for every recipe."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..config import RunConfig


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) seeded alike, so a run repeats exactly."""
    from accelerate.utils import set_seed

    set_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker seeding: derived from torch's per-worker seed, so runs repeat exactly."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_accelerator(cfg: RunConfig, project_dir: str):
    """Accelerator with gloo when CUDA is absent (DeepSpeed on CPU needs it), TensorBoard logging.

    `cpu=True` is not passed under DeepSpeed: accelerate would silently fall back to plain DDP.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        kwargs_handlers=handlers,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=os.path.join(project_dir, "logs")),
        cpu=not torch.cuda.is_available() and not _deepspeed_launch(),
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":
        # our loaders batch through a length-grouped batch sampler, so accelerate cannot read a batch size
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.trainer.batch_size
    return accelerator


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
