"""Checks of what a multi-process run left on disk: proof that DeepSpeed (not a silent DDP fallback) ran,
and that a saved LoRA adapter holds trained, whole tensors."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def check_zero_state(state: Path, stage: int, ranks: int = 2) -> None:
    """accelerate + DeepSpeed write one ZeRO optimiser shard per rank; plain DDP writes optimizer.bin instead
    (accelerate drops DeepSpeed silently, e.g. under ACCELERATE_USE_CPU=true or Accelerator(cpu=True))."""
    shards = sorted(state.glob("pytorch_model/zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    assert [p.name[:14] for p in shards] == [f"zero_pp_rank_{r}" for r in range(ranks)], (
        f"no per-rank ZeRO optimiser shards under {state}: DeepSpeed was not engaged; found "
        f"{sorted(str(p.relative_to(state)) for p in state.rglob('*') if p.is_file())}"
    )
    ckpt = torch.load(shards[0], map_location="cpu", weights_only=False)
    assert ckpt["ds_config"]["zero_optimization"]["stage"] == stage
    optim = ckpt["optimizer_state_dict"]
    assert int(optim["zero_stage"]) == stage, optim["zero_stage"]
    counts = optim["partition_count"]
    assert all(n == ranks for n in (counts if isinstance(counts, list | tuple) else [counts])), counts


def check_adapter(weights: Path) -> None:
    """`weights/adapter` is a PEFT adapter whose lora_B tensors (zero at the start) moved and are whole."""
    path = weights / "adapter" / "adapter_model.safetensors"
    assert (weights / "adapter" / "adapter_config.json").is_file() and path.is_file()
    tensors = load_file(path)
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b, f"{path} holds no lora_B tensor: {sorted(tensors)[:8]}"
    assert all(v.numel() > 0 for v in tensors.values()), "partitioned (empty) tensors saved"
    assert any(v.abs().sum() > 0 for v in lora_b.values()), "every lora_B is zero: adapter saved empty/untrained"
    assert all(torch.isfinite(v).all() for v in tensors.values())
