"""`emoq ls`, `emoq cp`, `emoq validate`: what ships with emoq, copied out or checked (torchtune habit)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..recipes import (
    CONFIGS_DIR,
    RECIPES,
    NotShippedError,
    find_shipped,
    run_configs,
    shipped_configs,
    shipped_scripts,
)


def shipped(name: str, command: str) -> Path:
    """`find_shipped` for a command: an unknown name ends the command with one line naming the known ones."""
    try:
        return find_shipped(name)
    except NotShippedError as err:
        raise SystemExit(f"emoq {command}: {err}") from None


def cmd_ls(args) -> int:
    from ..hub import BUILTIN_MODELS

    print("Recipes (emoq run NAME --config CFG):")
    for entry in RECIPES.values():
        print(f"  {entry.name:16s} {entry.summary}")
        for config in entry.configs():
            print(f"    --config {config}")
    print("Launcher configs (emoq run ... --accelerate-config NAME):")
    for name in shipped_configs():
        if name.startswith(("accelerate/", "deepspeed/")):
            print(f"  {name}")
    print("Cluster scripts (emoq cp NAME .):")
    for name in shipped_scripts():
        print(f"  {name}")
    print("Built-in models (offline, from PyPI packages):")
    for name, desc in BUILTIN_MODELS.items():
        print(f"  {'builtin:' + name:40s} {desc}")
    return 0


def cmd_cp(args) -> int:
    src = shipped(args.name, "cp")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise SystemExit(f"emoq cp: {dest} exists (use --force to overwrite)")
    shutil.copyfile(src, dest)
    shown = src.relative_to(CONFIGS_DIR.parent) if src.is_relative_to(CONFIGS_DIR.parent) else src
    print(f"copied {shown} -> {dest}")
    return 0


def cmd_validate(args) -> int:
    from ..config import ConfigError, load_config

    paths = [shipped(c, "validate") for c in args.configs] or list(run_configs().values())
    failed = 0
    for path in paths:
        try:
            load_config(path)
            print(f"ok     {path}")
        except ConfigError as err:
            failed += 1
            print(f"error  {err}")
    return 1 if failed else 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("ls", help="list shipped recipes, configs and built-in models",
                              description="List what ships with emoq: recipes (for `emoq run`) with the configs "
                              "written for each (for --config, `emoq cp`, `emoq validate`), the launcher configs, "
                              "and the builtin:* models usable offline.")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("cp", help="copy a recipe or config out for editing")
    p.add_argument("name", help="recipe (e.g. stage2_llm), config (e.g. emoq/demo_cpu) or cluster script "
                   "(e.g. slurm/stage2_multinode.sbatch)")
    p.add_argument("dest", help="destination file or folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_cp)

    p = subparsers.add_parser("validate", help="validate configs (no argument: every shipped config)")
    p.add_argument("configs", nargs="*", metavar="CONFIG",
                   help="config names (emoq ls) or YAML paths; each is loaded with the strict checks of `emoq run` "
                   "(unknown keys, wrong types, invalid choices); exit status 1 if any fails")
    p.set_defaults(func=cmd_validate)
