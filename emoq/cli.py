"""`emoq` command line (torchtune habit: run / ls / cp / validate, plus the task commands).

Each task command lives in its own module that exposes `add_parser(subparsers)`; those modules keep
their heavy imports (torch, transformers) inside functions so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = PROJECT_ROOT / "recipes"
CONFIGS_DIR = PROJECT_ROOT / "configs"

# task commands: name -> module exposing add_parser(subparsers)
TASK_COMMANDS = {
    "prepare": "emoq.data.prepare",
    "eval": "emoq.evaluate",
    "chat": "emoq.chat",
    "demo": "emoq.demo",
    "predict": "emoq.predict",
    "export": "emoq.export",
    "serve": "emoq.serve",
}


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.py"))} if RECIPES_DIR.is_dir() else {}


def load_recipe(name: str):
    """Import a shipped recipe script as a module (for the demo and tests: setup/train/cleanup)."""
    import importlib.util

    path = find_shipped(name)
    spec = importlib.util.spec_from_file_location(f"emoq_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the recipe look their module up here
    spec.loader.exec_module(module)
    return module


def shipped_configs() -> dict[str, Path]:
    """Configs by their path under configs/ without extension, e.g. 'emoq/demo_cpu'."""
    if not CONFIGS_DIR.is_dir():
        return {}
    return {
        str(p.relative_to(CONFIGS_DIR).with_suffix("")): p
        for p in sorted(CONFIGS_DIR.rglob("*"))
        if p.suffix in (".yaml", ".yml", ".json")
    }


def find_shipped(name: str) -> Path:
    """A recipe or config by name ('stage2_llm', 'emoq/demo_cpu'), or a path that exists."""
    for table in (shipped_recipes(), shipped_configs()):
        if name in table:
            return table[name]
    path = Path(name)
    if path.exists():
        return path
    known = ", ".join([*shipped_recipes(), *shipped_configs()])
    raise SystemExit(f"emoq: no recipe or config named '{name}' (known: {known})")


# ------------------------------------------------------------------ ls / cp / validate / run


def cmd_ls(args) -> int:
    from .hub import BUILTIN_MODELS

    print("Recipes (emoq run NAME --config CFG):")
    for name in shipped_recipes():
        print(f"  {name}")
    print("Configs (configs/...):")
    for name in shipped_configs():
        print(f"  {name}")
    print("Built-in models (offline, from PyPI packages):")
    for name, desc in BUILTIN_MODELS.items():
        print(f"  {'builtin:' + name:40s} {desc}")
    return 0


def cmd_cp(args) -> int:
    src = find_shipped(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise SystemExit(f"emoq cp: {dest} exists (use --force to overwrite)")
    shutil.copyfile(src, dest)
    print(f"copied {src.relative_to(PROJECT_ROOT) if src.is_relative_to(PROJECT_ROOT) else src} -> {dest}")
    return 0


def cmd_validate(args) -> int:
    from .config import ConfigError, load_config

    paths = [find_shipped(c) for c in args.configs] or [
        p for p in shipped_configs().values() if p.suffix in (".yaml", ".yml") and "accelerate" not in p.parts
    ]
    failed = 0
    for path in paths:
        try:
            load_config(path)
            print(f"ok     {path}")
        except ConfigError as err:
            failed += 1
            print(f"error  {err}")
    return 1 if failed else 0


def launch_command(recipe: Path, config: Path, overrides: list[str], nproc: int, accelerate_config: str | None):
    """The command `emoq run` executes; None means in-process (single process, no launcher)."""
    if nproc <= 1 and accelerate_config is None:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        path = find_shipped(accelerate_config if "/" in accelerate_config else f"accelerate/{accelerate_config}")
        cmd += ["--config_file", str(path)]
        ds_json = _deepspeed_json(path)
        if ds_json is not None:  # the YAML names it relative to the repository; make it work from any folder
            cmd += ["--deepspeed_config_file", str(ds_json)]
    elif not _has_cuda():
        cmd += ["--multi_gpu"]  # with ACCELERATE_USE_CPU=true this really starts N gloo processes on CPU
    cmd += ["--num_processes", str(max(nproc, 1)), str(recipe), "--config", str(config), *overrides]
    return cmd


def _deepspeed_json(accelerate_yaml: Path) -> Path | None:
    """The DeepSpeed JSON an accelerate config points at, resolved (relative paths: against the project)."""
    import yaml

    data = yaml.safe_load(accelerate_yaml.read_text(encoding="utf-8")) or {}
    name = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if data.get("distributed_type") != "DEEPSPEED" or not name:
        return None
    path = Path(name)
    for candidate in (path, accelerate_yaml.parent / path, PROJECT_ROOT / path):
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
    recipe = find_shipped(args.recipe)
    if recipe.suffix != ".py":
        raise SystemExit(f"emoq run: '{args.recipe}' is not a recipe")
    config = find_shipped(args.config)
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


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emoq",
        description="emoq: speech emotion recognition with an EmoQ-Former and a LoRA-tuned LLM.",
        epilog="Examples:\n  emoq ls\n  emoq run stage1_qformer --config emoq/demo_cpu trainer.max_steps=2\n"
        "  emoq run stage2_llm --config emoq/demo_cpu --nproc 2 --accelerate-config zero2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", help="list shipped recipes, configs and built-in models",
                       description="List what ships with emoq: recipes (for `emoq run`), configs under configs/ "
                       "(for --config, `emoq cp`, `emoq validate`) and the builtin:* models usable offline.")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cp", help="copy a recipe or config out for editing")
    p.add_argument("name", help="recipe (e.g. stage2_llm) or config (e.g. emoq/demo_cpu)")
    p.add_argument("dest", help="destination file or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_cp)

    p = sub.add_parser("validate", help="validate configs (no argument: every shipped config)")
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="config names (emoq ls) or YAML paths; each is loaded with the strict checks of `emoq run` "
                   "(unknown keys, wrong types, invalid choices); exit status 1 if any fails")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
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

    for name, module in TASK_COMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ImportError as err:  # an optional dependency missing must not break the other commands
            p = sub.add_parser(name, help=f"(unavailable: {err})")
            p.set_defaults(func=lambda args, err=err: sys.exit(f"emoq: {err}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `run RECIPE --config C k=v`: argparse binds the (empty) overrides at RECIPE, so the k=v after an
    # option arrive as unknown arguments; collect them in order, and reject anything that is not k=v
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if getattr(args, "command", None) != "run" or any("=" not in a or a.startswith("-") for a in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
