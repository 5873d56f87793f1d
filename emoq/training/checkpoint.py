"""Checkpoints: weights (HF + PEFT, safetensors) kept apart from resumable state (accelerate), written atomically.

Layout of one checkpoint folder:
    weights/            save_pretrained (model.safetensors + config.json with id2label), processor files,
                        adapter/ (LoRA in PEFT format), run_config.yaml
    state/              accelerator.save_state: optimizer, scheduler, RNG, sampler position
    trainer_state.json  step, epoch, metrics; written last, so its presence marks a complete checkpoint

Atomicity: everything is written into `.NAME.tmp` and renamed into place only when complete, so a
process killed mid-write (even SIGKILL) leaves the previous checkpoint intact and loadable.
Under ZeRO-3 the weights come from `accelerator.get_state_dict`, which gathers the partitioned
parameters (saving LoRA from partitioned parameters would write empty adapters).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from ..config import save_config
from ..files import swap_in

STATE_FILE = "trainer_state.json"


def save_checkpoint(accelerator, model, processor, path: Path, trainer_state: dict, run_config=None,
                    with_state: bool = True) -> Path:
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank must call it
    if with_state:
        accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        weights = tmp / "weights"
        # EmoQ with LoRA (the baselines have none); first: transformers' save_pretrained empties the state dict it is given
        if getattr(unwrapped.config, "lora", None):
            unwrapped.save_adapter(weights / "adapter", state_dict=state_dict)
        unwrapped.save_pretrained(weights, state_dict=dict(state_dict), safe_serialization=True)
        processor.save_pretrained(weights)
        if run_config is not None:
            save_config(run_config, weights / "run_config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        swap_in(tmp, path)
    accelerator.wait_for_everyone()
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / "weights" / "config.json").is_file()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-STEP` folder (incomplete `.tmp` folders are ignored)."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def read_trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the `keep` newest periodic checkpoints (best/ and final/ are never pruned)."""
    ckpts = sorted(
        (int(m.group(1)), p)
        for p in Path(output_dir).glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    for _, p in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
