"""`emoq run RECIPE --config CFG [k=v ...]`: in process, or through `accelerate launch` (printed first)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..recipes import CONFIGS_DIR, RECIPES
from .catalog import shipped


def launch_command(recipe: Path, config: Path, overrides: list[str], nproc: int, accelerate_config: str | None):
    """The command `emoq run` executes; None means in-process (single process, no launcher)."""
    if nproc <= 1 and accelerate_config is None:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        path = shipped(accelerate_config if "/" in accelerate_config else f"accelerate/{accelerate_config}", "run")
        cmd += ["--config_file", str(path)]
        ds_json = _deepspeed_json(path)
        if ds_json is not None:  # the YAML names it relative to the configs' parent; make it work from any folder
            cmd += ["--deepspeed_config_file", str(ds_json)]
    elif not _has_cuda():
        cmd += ["--multi_gpu"]  # with ACCELERATE_USE_CPU=true this really starts N gloo processes on CPU
    cmd += ["--num_processes", str(max(nproc, 1)), str(recipe), "--config", str(config), *overrides]
    return cmd


def _deepspeed_json(accelerate_yaml: Path) -> Path | None:
    """The DeepSpeed JSON an accelerate config points at, resolved (relative paths: against the file, the
    current folder, then the folder that holds the shipped `configs/`)."""
    import yaml

    data = yaml.safe_load(accelerate_yaml.read_text(encoding="utf-8")) or {}
    name = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if data.get("distributed_type") != "DEEPSPEED" or not name:
        return None
    path = Path(name)
    for candidate in (path, accelerate_yaml.parent / path, CONFIGS_DIR.parent / path):
        if candidate.is_file():
            return candidate.resolve()
    raise SystemExit(f"emoq run: {accelerate_yaml}: deepspeed_config_file '{name}' not found")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cmd_run(args) -> int:
    recipe = shipped(args.recipe, "run")
    if recipe.suffix != ".py":
        raise SystemExit(f"emoq run: '{args.recipe}' is not a recipe (recipes: {', '.join(RECIPES)})")
    config = shipped(args.config, "run")
    cmd = launch_command(recipe, config, args.overrides, args.nproc, args.accelerate_config)
    if cmd is None:
        argv = [str(recipe), "--config", str(config), *args.overrides]
        print("launch: python " + shlex.join(argv), flush=True)
        import runpy

        sys.argv = argv
        runpy.run_path(str(recipe), run_name="__main__")
        return 0
    env = dict(os.environ)
    if not _has_cuda() and "--deepspeed_config_file" not in cmd:
        # real gloo processes on CPU; not under DeepSpeed, which accelerate drops when told to use the CPU
        env.setdefault("ACCELERATE_USE_CPU", "true")
    print("launch: " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "run",
        help="run a recipe with a config and key=value overrides",
        description="Runs RECIPE in process (one process) or through `accelerate launch` (--nproc > 1 or "
        "--accelerate-config). Prints the exact launch command.",
    )
    p.add_argument("recipe", help="recipe name (emoq ls) or path to a recipe script")
    p.add_argument("--config", required=True, help="config name (emoq ls) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=2")
    p.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
    p.add_argument(
        "--accelerate-config", default=None,
        help="accelerate config under configs/accelerate (cpu_ddp, single_gpu, ddp, zero2, zero3) or a path",
    )
    p.set_defaults(func=cmd_run)
    return p
