"""The recipes and configs that ship inside the emoq package (torchtune habit: a registry that `emoq ls` reads).

The recipes are plain scripts (`setup -> train -> cleanup`) that also import as modules
(`emoq.recipes.stage2_llm`); the configs are YAML files under `emoq/configs/`, named by their path there
without the extension (`emoq/demo_cpu`). Both live inside the package so that a wheel install can list,
copy and run them; the repository's top-level `recipes/` and `configs/` point at these folders.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = RECIPES_DIR.parent / "configs"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class RecipeEntry:
    """A shipped recipe and the config folders written for it."""

    name: str
    summary: str
    config_folders: tuple[str, ...]

    @property
    def path(self) -> Path:
        return RECIPES_DIR / f"{self.name}.py"

    def configs(self) -> list[str]:
        return [name for name in shipped_configs() if name.split("/", 1)[0] in self.config_folders]


RECIPES: dict[str, RecipeEntry] = {
    entry.name: entry
    for entry in (
        RecipeEntry("stage1_qformer", "EmoQ stage 1: EmoQ-Former pre-training with MAL (focal + SupCon)", ("emoq",)),
        RecipeEntry("stage2_llm", "EmoQ stage 2: LoRA / QLoRA LLM fine-tuning with soft prompts", ("emoq",)),
        RecipeEntry("train_baseline", "Qieemo or Patamia et al. 2023, trained the way EmoQ is",
                    ("qieemo", "patamia")),
    )
}


class NotShippedError(LookupError):
    """A name that is neither a shipped recipe or config nor an existing path."""


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by its name under configs/ without extension, e.g. 'emoq/demo_cpu'."""
    return {
        str(p.relative_to(CONFIGS_DIR).with_suffix("")): p
        for p in sorted(CONFIGS_DIR.rglob("*"))
        if p.suffix in CONFIG_SUFFIXES
    }


def run_configs() -> dict[str, Path]:
    """The shipped run configs (what `--config` takes), without the accelerate / DeepSpeed launcher files."""
    return {name: p for name, p in shipped_configs().items()
            if p.suffix in (".yaml", ".yml") and name.split("/", 1)[0] not in ("accelerate", "deepspeed")}


def shipped_scripts() -> dict[str, Path]:
    """Every shipped cluster script by its path under configs/, e.g. 'slurm/stage2_multinode.sbatch'."""
    return {str(p.relative_to(CONFIGS_DIR)): p for p in sorted(CONFIGS_DIR.rglob("*.sbatch"))}


def find_shipped(name: str) -> Path:
    """A recipe, config or cluster script by name ('stage2_llm', 'emoq/demo_cpu',
    'slurm/stage2_multinode.sbatch'), or a path that exists."""
    if name in RECIPES:
        return RECIPES[name].path
    configs = shipped_configs()
    if name in configs:
        return configs[name]
    path = Path(name)
    if path.exists():
        return path
    scripts = shipped_scripts()
    if name in scripts:
        return scripts[name]
    raise NotShippedError(f"no recipe or config named '{name}' (known: {', '.join([*RECIPES, *configs])})")


def load_recipe(name: str):
    """A shipped recipe (its `setup`, `train`, `cleanup`), for the demo and tests."""
    if name not in RECIPES:
        raise NotShippedError(f"no recipe named '{name}' (known: {', '.join(RECIPES)})")
    return importlib.import_module(f"{__name__}.{name}").RECIPE
