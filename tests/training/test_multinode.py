"""Training over several machines, played on one host: two launches ("machine" 0 and "machine" 1), one
process each, meeting over 127.0.0.1 on a free port, through stage 2 for 2 optimiser steps.

Each machine runs what a user types on each node of a cluster:
  python -m emoq.cli run stage2_llm --config emoq/tiny_test --nproc 1 --num-machines 2 --machine-rank R
      --main-process-ip 127.0.0.1 --main-process-port P [--accelerate-config multi_node] ...
which `emoq run` turns into `accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1
--main_process_port P --num_processes 2` (the total over both machines); on CPU with ACCELERATE_USE_CPU=true
and --multi_gpu (gloo DDP), or with the shipped configs/accelerate/multi_node.yaml (DeepSpeed ZeRO-2 over
gloo, torchrun on each machine). Both machines write into one output folder, as nodes sharing a filesystem do.

Proof that the two launches formed one run of world size 2:
  * the final checkpoint's trainer_state.json records num_processes = 2 (accelerator.num_processes);
  * steps_per_epoch comes from the train loader sharded over 2 ranks: 24 clips / batch 4 = 6 batches on
    one process, 3 per process on two;
  * each machine's own log holds the one "init_from is null" warning of its one training process;
  * under DeepSpeed, checkpoint-1 holds one ZeRO-2 optimiser shard per rank, rank 1's written by machine 1.

Also here: the launch command's multi-machine flags (no launch), and the shipped SLURM script run end to end
(stage 1 then stage 2) under stand-ins for srun and scontrol that play two nodes on this host.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.corpora import make_tone_corpus
from support.environment import require_module, tail

REPO = Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS = 8  # 3 classes -> 24 train clips
BATCH = 4  # -> 6 batches per epoch on one process, 3 per process on two
TIMEOUT = 400  # seconds for both machines together; a busy 2-core host is slow to start two torch processes
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": TRAIN_PER_CLASS, "dev": 2})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in LAUNCHER_ENV:
        env.pop(key, None)  # a launcher around pytest must not leak into the launched ranks
    return env


def _run_two_machines(corpus: Path, out: Path, logs: Path, options=(), overrides=()) -> list[str]:
    """Starts machine 0 then machine 1 (each its own process group, its output in logs/machineR.log), waits
    for both; on a failure or timeout kills both groups and fails with both logs' tails. Returns the logs."""
    port = _free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    start = time.monotonic()
    try:
        for rank in (0, 1):
            cmd = [
                sys.executable, "-m", "emoq.cli", "run", "stage2_llm", "--config", "emoq/tiny_test",
                "--nproc", "1", "--num-machines", "2", "--machine-rank", str(rank),
                "--main-process-ip", "127.0.0.1", "--main-process-port", str(port), *options,
                f"data.root={corpus}", f"trainer.output_dir={out}", "stage2.init_from=null",
                f"trainer.batch_size={BATCH}", "trainer.max_steps=2", "stage2.epochs=1", *overrides,
            ]
            files.append(open(logs / f"machine{rank}.log", "w+", encoding="utf-8"))  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=files[-1], stderr=subprocess.STDOUT,
                                          start_new_session=True))
        failure = None
        for rank, proc in enumerate(procs):
            try:
                rc = proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                failure = f"machine {rank} still running after {TIMEOUT}s"
                break
            if rc != 0:
                failure = f"machine {rank} exited with {rc}"
                break
    finally:
        for proc in procs:
            if proc.poll() is None:  # the launcher and the ranks it started share its process group
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        texts = []
        for f in files:
            f.seek(0)
            texts.append(f.read())
            f.close()
    print(f"{' '.join(options) or 'ddp'}: two machines in {time.monotonic() - start:.1f}s")
    if failure:
        shown = "\n".join(f"--- machine {rank}\n{tail(text)}" for rank, text in enumerate(texts))
        pytest.fail(f"{failure}\n{shown}")
    return texts


def _check_one_run_of_two_ranks(texts: list[str], out: Path) -> dict:
    for rank, text in enumerate(texts):
        launch = [line for line in text.splitlines() if line.startswith("launch: ")]
        assert launch, text[:2000]
        for flag in ("--num_machines 2", f"--machine_rank {rank}", "--main_process_ip 127.0.0.1",
                     "--num_processes 2"):
            assert flag in launch[0], (flag, launch[0])
        # one training process per machine: its warning is in that machine's own log, once
        assert text.count("stage2.init_from is null") == 1, f"machine {rank} did not train:\n{tail(text)}"
    state = json.loads((out / "stage2" / "final" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2, (state, "the two machines did not form one world of size 2")
    single = -(-TRAIN_PER_CLASS * 3 // BATCH)
    assert state["steps_per_epoch"] == single // 2, (state, "the train loader was not sharded over 2 ranks")
    assert state["step"] == state["total_steps"] == 2, state
    assert all(v == v for v in state["losses"]) and len(state["losses"]) >= 1, state  # logged and finite (not NaN)
    return state


@pytest.mark.slow
def test_two_machines_ddp_cpu(corpus, tmp_path):
    texts = _run_two_machines(corpus, tmp_path / "run", tmp_path / "logs")
    assert all("--multi_gpu" in text for text in texts)  # gloo DDP on CPU (emoq run sets ACCELERATE_USE_CPU)
    _check_one_run_of_two_ranks(texts, tmp_path / "run")


@pytest.mark.slow
def test_two_machines_deepspeed_zero2_with_the_shipped_multi_node_config(corpus, tmp_path):
    require_module("deepspeed", "pip install deepspeed")
    texts = _run_two_machines(corpus, tmp_path / "run", tmp_path / "logs", ["--accelerate-config", "multi_node"],
                              ["trainer.save_every=1"])
    assert all("--deepspeed_multinode_launcher standard" in text for text in texts)
    _check_one_run_of_two_ranks(texts, tmp_path / "run")
    state = tmp_path / "run" / "stage2" / "checkpoint-1" / "state"
    shards = sorted(p.name[:14] for p in state.glob("pytorch_model/zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    assert shards == ["zero_pp_rank_0", "zero_pp_rank_1"], (
        f"no per-rank ZeRO-2 optimiser shards under {state}: "
        f"{sorted(str(p.relative_to(state)) for p in state.rglob('*') if p.is_file())}"
    )


def _launch(nproc=1, accelerate_config=None, **machines) -> list[str]:
    from emoq.cli.run import launch_command
    from emoq.recipes import find_shipped

    return launch_command(find_shipped("stage2_llm"), Path("c.yaml"), [], nproc, accelerate_config, **machines)


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_nproc_is_per_machine_and_accelerate_gets_the_total():
    cmd = _launch(8, "multi_node", num_machines=2, machine_rank=1, main_process_ip="10.0.0.1", main_process_port=29511)
    assert _value(cmd, "--num_processes") == "16" and _value(cmd, "--num_machines") == "2"
    assert _value(cmd, "--machine_rank") == "1" and _value(cmd, "--main_process_ip") == "10.0.0.1"
    assert _value(cmd, "--main_process_port") == "29511"
    assert _value(cmd, "--deepspeed_multinode_launcher") == "standard"  # torchrun here, not pdsh over ssh
    assert Path(_value(cmd, "--deepspeed_config_file")).is_absolute()
    # the machine count also comes from the accelerate config; one machine needs no launcher without --nproc
    assert _value(_launch(4, "multi_node", machine_rank=0, main_process_ip="h0"), "--num_processes") == "8"
    one = _launch(1, None, num_machines=2, machine_rank=0, main_process_ip="h0")
    assert "--multi_gpu" in one and _value(one, "--num_processes") == "2" and "--main_process_port" not in one
    assert _launch(1, None, num_machines=1) is None


def test_one_machine_launch_is_unchanged():
    for config in (None, "zero2", "ddp"):
        cmd = _launch(2, config)
        assert _value(cmd, "--num_processes") == "2"
        assert not {"--num_machines", "--machine_rank", "--main_process_ip", "--deepspeed_multinode_launcher"} & set(cmd)


def test_several_machines_need_a_rank_and_the_address_of_machine_0():
    with pytest.raises(SystemExit, match="--machine-rank is required with 2 machines"):
        _launch(8, "multi_node", main_process_ip="10.0.0.1")
    with pytest.raises(SystemExit, match="--main-process-ip is required"):
        _launch(8, "multi_node", machine_rank=0)  # the shipped config leaves main_process_ip empty on purpose
    with pytest.raises(SystemExit, match="--machine-rank 2 is not in 0..1"):
        _launch(8, "multi_node", machine_rank=2, main_process_ip="10.0.0.1")


def test_the_slurm_script_ships_and_copies_out(tmp_path, capsys):
    from emoq.cli import main

    assert main(["ls"]) == 0
    assert "slurm/stage2_multinode.sbatch" in capsys.readouterr().out
    assert main(["cp", "slurm/stage2_multinode.sbatch", str(tmp_path)]) == 0
    script = (tmp_path / "stage2_multinode.sbatch").read_text()
    assert script.startswith("#!/bin/bash") and "--machine_rank \"$SLURM_NODEID\"" in script
    for needed in ("scontrol show hostnames", "SLURM_NNODES * GPUS_PER_NODE", "stage1_qformer stage2_llm",
                   "emoq/meld_whisper-large-v3_qwen2.5-7b_lora"):
        assert needed in script, needed
    if shutil.which("bash"):
        check = subprocess.run(["bash", "-n", str(tmp_path / "stage2_multinode.sbatch")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


FAKE_SRUN = """#!/bin/bash
# stands in for srun on one host: drops srun's options, runs the task once per node of the job at the same
# time with SLURM_NODEID set, each node's output in nodeN.log
while [[ "$1" == --* ]]; do case "$1" in --nodes|--ntasks-per-node) shift 2;; *) shift;; esac; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n "$@" > "node$n.log" 2>&1 & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_the_slurm_script_trains_both_stages_on_two_nodes(corpus, tmp_path):
    """The shipped sbatch script under a stand-in srun / scontrol: two "nodes" on this host (127.0.0.1),
    one process each, stage 1 then stage 2 through configs/accelerate/multi_node.yaml."""
    require_module("deepspeed", "pip install deepspeed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\necho 127.0.0.2\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = _env()
    env.update(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
               SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", CONFIG="emoq/tiny_test", GPUS_PER_NODE="1",
               MAIN_PORT=str(_free_port()))
    out = tmp_path / "run"
    script = REPO / "emoq" / "configs" / "slurm" / "stage2_multinode.sbatch"
    cmd = ["bash", str(script), f"data.root={corpus}", f"trainer.output_dir={out}", "trainer.max_steps=2",
           f"trainer.batch_size={BATCH}"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {TIMEOUT}s\n{tail(err.stdout)}\n{tail(err.stderr)}")
    nodes = [(tmp_path / f"node{n}.log").read_text() if (tmp_path / f"node{n}.log").exists() else "" for n in (0, 1)]
    shown = "\n".join(f"--- node {n}\n{tail(text, 3000)}" for n, text in enumerate(nodes))
    assert proc.returncode == 0, f"rc={proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}\n{shown}"
    assert "stage1_qformer: accelerate launch --machine_rank $SLURM_NODEID" in proc.stdout, proc.stdout
    for stage in ("stage1", "stage2"):
        state = json.loads((out / stage / "final" / "trainer_state.json").read_text())
        assert state["num_processes"] == 2 and state["step"] == 2, (stage, state)
    assert "init_from is null" not in "".join(nodes)  # stage 2 started from stage 1's checkpoint
