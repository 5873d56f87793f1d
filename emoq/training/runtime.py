"""Where a run executes: seeding and the accelerator (DDP, DeepSpeed, CPU gloo), set up the same for every recipe."""

from __future__ import annotations

import os
import random
from contextlib import contextmanager

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
    if plugin is not None:
        configure_deepspeed(plugin.deepspeed_config, cfg)
    return accelerator


def configure_deepspeed(ds_config: dict, cfg: RunConfig) -> None:
    """Fill the DeepSpeed config the way emoq trains, in place (before `accelerator.prepare`).

    Mixed precision runs as torch autocast inside the engine ("torch_autocast"), not as DeepSpeed's "bf16"
    mode: that mode casts every parameter of the model to bf16, so the EmoQ-Former — which computes in fp32,
    autocast off — would meet bf16 weights, and the LoRA and EmoQ-Former weights the optimiser updates would
    be bf16. With autocast, parameters keep the dtypes they were built with (frozen encoder and LLM in bf16,
    everything that trains in fp32) and gradients are reduced in fp32, exactly as under DDP. fp16 would need
    loss scaling that autocast under ZeRO does not provide, so it is refused.
    """
    precision = cfg.trainer.mixed_precision
    if precision == "fp16":
        raise ValueError("trainer.mixed_precision=fp16 is not supported under DeepSpeed (no loss scaling with "
                         "autocast under ZeRO); use bf16")
    if precision == "bf16":
        ds_config["bf16"] = {"enabled": False}
        ds_config["fp16"] = {"enabled": False}
        # an empty list: no parameter is reduced in bf16 (the default would reduce every Linear's gradient in bf16)
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    if ds_config.get("train_micro_batch_size_per_gpu") == "auto":
        # our loaders batch through a length-grouped batch sampler, so accelerate cannot read a batch size
        ds_config["train_micro_batch_size_per_gpu"] = cfg.trainer.batch_size
    if ds_config.get("gradient_clipping") == "auto":
        # the engine clips (and skips a step whose gradient norm is not finite); accelerate's clip call is a no-op
        ds_config["gradient_clipping"] = cfg.trainer.max_grad_norm


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")


@contextmanager
def loading_pretrained_weights(accelerator):
    """Where recipes build their model. Under ZeRO-3, accelerate tells transformers to partition every
    `from_pretrained` while it loads (DeepSpeed's `zero.Init`) even when the accelerate config says
    `zero3_init_flag: false`; some models' weight initialisation then reads a partitioned (empty) shape —
    Whisper's positional table does, and fails. The shipped ZeRO-3 config asks for no init-time partitioning,
    so this honours it: weights load whole and `accelerator.prepare` partitions them. With
    `zero3_init_flag: true` loading stays partitioned, for models too large to load whole on each rank."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()
