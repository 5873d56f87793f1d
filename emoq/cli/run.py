"""`emoq run RECIPE --config CFG [k=v ...]`: in process, or through `accelerate launch` (printed first).

Several machines: run the same `emoq run` on every machine with `--num-machines N --machine-rank R
--main-process-ip IP_OF_MACHINE_0 [--main-process-port PORT]`; each starts `--nproc` processes, and accelerate
gets `--num_processes` = nproc x N, the total over all machines.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..recipes import CONFIGS_DIR, RECIPES
from .catalog import shipped


def launch_command(recipe: Path, config: Path, overrides: list[str], nproc: int, accelerate_config: str | None,
                   *, num_machines: int | None = None, machine_rank: int | None = None,
                   main_process_ip: str | None = None, main_process_port: int | None = None):
    """The command `emoq run` executes; None means in-process (single process, no launcher).

    `nproc` is the number of processes on this machine. `num_machines` defaults to the accelerate config's
    `num_machines` (1 without a config); with more than one machine, `machine_rank` and an address of
    machine 0 (`main_process_ip`, or the config's) are required, and accelerate is given the total
    `--num_processes` (nproc x num_machines) and torchrun on this machine (no pdsh / ssh under DeepSpeed).
    """
    path = settings = None
    if accelerate_config:
        path = shipped(accelerate_config if "/" in accelerate_config else f"accelerate/{accelerate_config}", "run")
        settings = read_yaml(path)
    machines = num_machines if num_machines is not None else int((settings or {}).get("num_machines") or 1)
    if machines < 1:
        raise SystemExit(f"emoq run: --num-machines must be at least 1, got {machines}")
    if nproc <= 1 and accelerate_config is None and machines <= 1:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    ds_json = None
    if path is not None:
        cmd += ["--config_file", str(path)]
        ds_json = deepspeed_json(path, settings)
        if ds_json is not None:  # the YAML names it relative to the configs' parent; make it work from any folder
            cmd += ["--deepspeed_config_file", str(ds_json)]
    elif not _has_cuda() or machines > 1:
        # with ACCELERATE_USE_CPU=true this really starts N gloo processes on CPU; on GPUs it makes a machine
        # with a single GPU join a multi-machine run instead of running alone
        cmd += ["--multi_gpu"]
    if machines > 1 or num_machines is not None:
        cmd += ["--num_machines", str(machines)]
    if machines > 1:
        cmd += _machine_options(machines, machine_rank, main_process_ip, main_process_port, settings)
        if ds_json is not None:  # torchrun on each machine, started by emoq run there (not pdsh over ssh)
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    cmd += ["--num_processes", str(max(nproc, 1) * machines), str(recipe), "--config", str(config), *overrides]
    return cmd


def _machine_options(machines: int, rank: int | None, ip: str | None, port: int | None, settings) -> list[str]:
    """accelerate's --machine_rank / --main_process_ip / --main_process_port, checked."""
    if rank is None:
        raise SystemExit(f"emoq run: --machine-rank is required with {machines} machines "
                         f"(0 on the machine at --main-process-ip, 1..{machines - 1} on the others)")
    if not 0 <= rank < machines:
        raise SystemExit(f"emoq run: --machine-rank {rank} is not in 0..{machines - 1}")
    ip = ip or (settings or {}).get("main_process_ip")
    if not ip:
        raise SystemExit(f"emoq run: --main-process-ip is required with {machines} machines "
                         "(an address of machine 0 that every machine can reach)")
    options = ["--machine_rank", str(rank), "--main_process_ip", str(ip)]
    if port is not None:
        options += ["--main_process_port", str(port)]
    return options


def read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def deepspeed_json(accelerate_yaml: Path, data: dict | None = None) -> Path | None:
    """The DeepSpeed JSON an accelerate config points at, resolved (relative paths: against the file, the
    current folder, then the folder that holds the shipped `configs/`)."""
    if data is None:
        data = read_yaml(accelerate_yaml)
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
    cmd = launch_command(recipe, config, args.overrides, args.nproc, args.accelerate_config,
                         num_machines=args.num_machines, machine_rank=args.machine_rank,
                         main_process_ip=args.main_process_ip, main_process_port=args.main_process_port)
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
        description="Runs RECIPE in process (one process) or through `accelerate launch` (--nproc > 1,\n"
        "--accelerate-config or --num-machines > 1). Prints the exact launch command.",
        epilog="Several machines: run the same command on every machine, changing only --machine-rank:\n"
        "  emoq run stage2_llm --config CFG --accelerate-config multi_node --nproc 8 --num-machines 2 \\\n"
        "      --machine-rank 0 --main-process-ip 10.0.0.1 --main-process-port 29500   # on 10.0.0.1\n"
        "  emoq run stage2_llm --config CFG --accelerate-config multi_node --nproc 8 --num-machines 2 \\\n"
        "      --machine-rank 1 --main-process-ip 10.0.0.1 --main-process-port 29500   # on the other machine\n"
        "This trains on 16 processes (accelerate launch --num_processes 16). Under SLURM: "
        "emoq cp slurm/stage2_multinode.sbatch .",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe name (emoq ls) or path to a recipe script")
    p.add_argument("--config", required=True, help="config name (emoq ls) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=2")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on THIS machine, usually its number of GPUs (default 1); with --num-machines N "
                   "accelerate launch gets --num_processes NPROC x N, the total over all machines")
    p.add_argument(
        "--accelerate-config", default=None,
        help="accelerate config under configs/accelerate (cpu_ddp, single_gpu, ddp, zero2, zero3, multi_node) or a path",
    )
    nodes = p.add_argument_group("several machines (accelerate launch --num_machines / --machine_rank / "
                                 "--main_process_ip / --main_process_port)")
    nodes.add_argument("--num-machines", type=int, default=None, metavar="N",
                       help="machines taking part (default: the accelerate config's num_machines, else 1)")
    nodes.add_argument("--machine-rank", type=int, default=None, metavar="R",
                       help="this machine's rank, 0..N-1; 0 is the machine at --main-process-ip (required when N > 1)")
    nodes.add_argument("--main-process-ip", default=None, metavar="IP",
                       help="an address of machine 0 that every machine can reach (required when N > 1, unless "
                       "the accelerate config sets main_process_ip)")
    nodes.add_argument("--main-process-port", type=int, default=None, metavar="PORT",
                       help="a free TCP port on machine 0, the same on every machine (default: the accelerate "
                       "config's main_process_port, else 29500)")
    p.set_defaults(func=cmd_run)
    return p
