"""Exact resume of a 2-process DeepSpeed ZeRO-2 run on CPU, through the real CLI.

(Plain 2-process DDP, ZeRO-2 and ZeRO-3 runs of every shipped config are in `test_scale_matrix.py`.)

The test runs `python -m emoq.cli run stage2_llm --config emoq/tiny_test ... --nproc 2 --accelerate-config
zero2` in a subprocess (`accelerate launch --config_file configs/accelerate/zero2.yaml`, DeepSpeed over gloo
with DS_ACCELERATOR=cpu).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.corpora import make_tone_corpus
from support.environment import require_module, tail

REPO = Path(__file__).resolve().parents[2]
TRAIN_PER_CLASS = 8  # 3 classes -> 24 train clips
BATCH = 4  # -> 6 batches per epoch on one process, 3 per process on two


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": TRAIN_PER_CLASS, "dev": 2})


def _run_stage2(corpus: Path, out: Path, options=(), overrides=(), *, timeout: int,
                recipe: str = "stage2_llm") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "emoq.cli", "run", "--config", "emoq/tiny_test", "--nproc", "2", *options,
        recipe, f"data.root={corpus}", f"trainer.output_dir={out}", "stage2.init_from=null",
        f"trainer.batch_size={BATCH}", "trainer.max_steps=0", "stage2.epochs=1", *overrides,
    ]
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on a small CPU: no thread oversubscription
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher around pytest must not leak into the launched ranks
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{tail(err.stdout)}\n{tail(err.stderr)}")
    print(f"{' '.join(options) or 'ddp'}: {time.monotonic() - start:.1f}s")
    assert proc.returncode == 0, f"rc={proc.returncode}\n--- stdout\n{tail(proc.stdout)}\n--- stderr\n{tail(proc.stderr)}"
    return proc


@pytest.mark.slow
def test_deepspeed_zero2_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    """2 ranks under ZeRO-2, 6 steps with a checkpoint every 2; a run stopped after step 3 (as if killed:
    the last checkpoint is step 2) and rerun must end with the uninterrupted run's losses and weights —
    DeepSpeed's partitioned optimiser state, the scheduler, RNG and the sharded sampler all restored."""
    require_module("deepspeed", "pip install deepspeed")
    stopper = tmp_path / "stage2_stop_at_3.py"
    stopper.write_text(
        "from emoq.recipes.stage2_llm import Stage2LLM\n"
        "class StopAfter3(Stage2LLM):\n"
        "    def train(self, state, stop_after=None):\n"
        "        return super().train(state, stop_after=3)\n"
        "StopAfter3().main()\n"
    )
    options, overrides = ["--accelerate-config", "zero2"], ["trainer.save_every=2", "stage2.epochs=2"]
    _run_stage2(corpus, tmp_path / "full", options, overrides, timeout=300)
    _run_stage2(corpus, tmp_path / "cut", options, overrides, timeout=300, recipe=str(stopper))
    assert sorted(p.name for p in (tmp_path / "cut" / "stage2").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "cut" / "stage2" / "final").exists()
    resumed = _run_stage2(corpus, tmp_path / "cut", options, overrides, timeout=300)
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout, resumed.stdout[-3000:]
    full, cut = (json.loads((tmp_path / run / "stage2/final/trainer_state.json").read_text()) for run in ("full", "cut"))
    assert full["step"] == cut["step"] == 6
    np.testing.assert_allclose(cut["losses"], full["losses"], rtol=1e-5, atol=1e-6)
    a, b = (load_file(tmp_path / run / "stage2/final/weights/model.safetensors") for run in ("full", "cut"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
