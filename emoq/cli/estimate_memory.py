"""`emoq estimate-memory CONFIG [--stage 1|2|all] [--nproc N] [--accelerate-config NAME] [k=v ...]`: per-GPU memory.

Works the memory of a training run out from its config — exact parameter counts from the model built on
the meta device (no weights read, nothing downloaded for the published checkpoints the shipped configs
name), the dtypes the run holds each part in, gradients and AdamW states as the launch shards them (DDP,
ZeRO-2, ZeRO-3), and the activation peak of one micro-batch — so `lora` on 8 GPUs under ZeRO-2 and
`qlora` on one 24 GB GPU can be compared before anything is launched:

    emoq estimate-memory emoq/meld_whisper-large-v3_qwen2.5-7b_lora --nproc 8 --accelerate-config zero2
    emoq estimate-memory emoq/meld_whisper-large-v3_qwen2.5-7b_qlora --accelerate-config single_gpu
    emoq estimate-memory emoq/meld_whisper-large-v3_qwen2.5-7b_lora --stage 2 trainer.batch_size=8 --json

Not counted: the CUDA context and the caching allocator's reserve (plan 1-2 GiB per GPU on top).
"""

from __future__ import annotations

import argparse
import json

from .catalog import shipped

STAGE_CHOICES = ("1", "2", "all")


def read_launch(accelerate_config: str | None, nproc: int | None, num_machines: int = 1):
    """The `Launch` of an accelerate config (shipped name or path) for `nproc` processes on each of
    `num_machines` machines, as `emoq run` counts them (default: the config's `num_processes`, which accelerate
    counts over all machines)."""
    from ..training.memory import Launch
    from .run import deepspeed_json, read_yaml

    if accelerate_config is None:
        return Launch(num_processes=(nproc or 1) * num_machines)
    path = shipped(accelerate_config if "/" in accelerate_config else f"accelerate/{accelerate_config}",
                   "estimate-memory")
    data = read_yaml(path)
    processes = nproc * num_machines if nproc else int(data.get("num_processes") or 1)
    device = "cpu" if data.get("use_cpu") else "cuda"
    if data.get("distributed_type") != "DEEPSPEED":
        return Launch(num_processes=processes, device=device)
    ds_json = deepspeed_json(path, data)
    ds = json.loads(ds_json.read_text(encoding="utf-8")) if ds_json is not None else {}
    return Launch.from_deepspeed_config(ds, processes, device=device)


def run_estimate(args) -> int:
    from ..config import ConfigError, load_config
    from ..training.memory import Workload, estimate_run, format_bytes, print_estimates, stages_of

    path = shipped(args.config, "estimate-memory")
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as err:
        raise SystemExit(f"emoq estimate-memory: {err}") from None
    stages = stages_of(cfg)
    if args.stage != "all":
        wanted = f"stage{args.stage}"
        if wanted not in stages:
            raise SystemExit(f"emoq estimate-memory: a {cfg.model.system} run has no stage {args.stage} "
                             f"(its stages: {', '.join(stages)}); use --stage all")
        stages = (wanted,)
    launch = read_launch(args.accelerate_config, args.nproc, args.num_machines)
    workload = Workload(batch_size=args.batch_size, audio_seconds=args.audio_seconds,
                        transcript_tokens=args.transcript_tokens)
    try:
        estimates = estimate_run(cfg, stages, launch, workload)
    except (OSError, ValueError, RuntimeError) as err:  # a model reference that cannot be read here
        raise SystemExit(f"emoq estimate-memory: {err}") from None
    if args.json:
        print(json.dumps({"config": args.config, "estimates": [e.as_dict() for e in estimates]}, indent=2))
        return 0
    n = launch.num_processes
    print_estimates(estimates, f"{args.config} ({launch.describe()}, {n} processes)" if n > 1 or launch.deepspeed
                    else f"{args.config} (1 process)")
    where = "process" if launch.device == "cpu" else "GPU"
    for e in estimates:
        print(f"{e.stage}: {format_bytes(e.total)} per {where} at the peak ({e.inputs['peak_during']})")
    print("The total is the peak of a training step (gradients, the activation peak and the optimizer step's "
          "temporaries do not all coexist).\nNot included: CUDA context and allocator reserve, about 1-2 GiB "
          "per GPU.")
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "estimate-memory", help="per-GPU memory of a training run, from its config (no GPU, no download)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="config name (emoq ls) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.batch_size=2")
    p.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                   help="EmoQ stage 1 (EmoQ-Former), 2 (LLM) or all (default); a baseline has one stage")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes (GPUs) on each machine, as for emoq run; default: the accelerate config's "
                   "num_processes, else 1")
    p.add_argument("--num-machines", type=int, default=1, metavar="N",
                   help="machines, each running --nproc processes (default 1): 2 x 8 GPUs is --nproc 8 --num-machines 2")
    p.add_argument("--accelerate-config", default=None,
                   help="launcher config under configs/accelerate (single_gpu, ddp, zero2, zero3, ...) or a path; "
                   "its DeepSpeed JSON gives the ZeRO stage")
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per GPU (default trainer.batch_size)")
    p.add_argument("--audio-seconds", type=float, default=None, help="clip length (default data.max_seconds)")
    p.add_argument("--transcript-tokens", type=int, default=None,
                   help="transcript length in tokens (default 128, the EmoQ-Former's cap)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_estimate)
    return p
