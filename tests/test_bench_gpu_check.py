"""`bench/gpu_check.py --shipped`: the real-size bench's flow (shipped config -> stand-ins -> generated corpus ->
recipe -> timed steps -> JSON), run with tiny stand-ins on CPU, for one EmoQ config and one baseline."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.environment import tail

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("emoq/meld_whisper-large-v3_qwen2.5-7b_lora", "patamia/iemocap_wav2vec2-large_bert-base")


def _environment() -> dict:
    env = dict(os.environ)
    for key, value in (("OMP_NUM_THREADS", "1"), ("DS_ACCELERATOR", "cpu"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nrc={proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    return proc


@pytest.mark.slow
def test_shipped_configs_run_through_the_recipes_with_tiny_stand_ins(tmp_path):
    out = tmp_path / "gpu_check.json"
    _bench("--shipped", "--stand-in", "tiny", "--steps", "2", "--configs", *CONFIGS, "--json", str(out),
           "--workdir", str(tmp_path / "work"))
    report = json.loads(out.read_text())
    assert report["stand_in"] == "tiny" and report["device"] == "cpu" and report["peak_bf16_tflops"] is None
    assert list(report["results"]) == list(CONFIGS)
    expected = {CONFIGS[0]: "stage2_llm", CONFIGS[1]: "train_baseline"}
    for name, recipe in expected.items():
        run = report["results"][name][recipe]
        assert "error" not in run, run["error"]
        assert run["steps"] == 2 and run["timed_steps"] == 1 and run["skipped_steps"] == 0, run
        assert len(run["losses"]) == 2 and all(math.isfinite(v) for v in run["losses"]) and run["loss_finite"]
        assert run["samples_per_s"] > 0 and run["step_time_s"] > 0 and run["tflops_per_step"] > 0, run
        # one optimiser step is batch_size x accumulation training samples
        per_step = run["batch_size"] * run["gradient_accumulation_steps"]
        assert run["samples_per_s"] * run["step_time_s"] == pytest.approx(per_step, rel=0.01), run
        assert run["mfu"] is None and run["peak_gpu_memory_gib"] is None  # no GPU, no peak FLOP/s
        assert run["num_processes"] == 1 and run["mixed_precision"] == "bf16"
        dtypes = run["parameter_dtypes"]
        assert {d for kinds in dtypes.values() for d in kinds.get("trainable", [])} == {"float32"}, dtypes
        assert any(f"data.root={tmp_path / 'work'}" in o for o in run["overrides"]), run["overrides"]
    emoq = report["results"][CONFIGS[0]]["stage2_llm"]
    # the LLM's base weights are frozen but backprop passes through them (LoRA); the speech encoder runs forward only
    kinds = emoq["tflops_per_step_by_kind"]
    assert kinds["frozen_backprop_through"] > 0 and kinds["frozen_forward_only"] > 0 and kinds["trained"] > 0, kinds
    assert emoq["parameter_dtypes"]["language_model"]["frozen"] == ["bfloat16"], emoq["parameter_dtypes"]
    assert emoq["llm_tokens_per_sample"] > 0
    assert report["results"][CONFIGS[1]]["train_baseline"]["llm_tokens_per_sample"] is None


def test_real_size_without_a_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real-size run would start")
    out = tmp_path / "skipped.json"
    proc = _bench("--shipped", "--configs", CONFIGS[0], "--json", str(out), timeout=300)
    assert "no CUDA device" in proc.stdout
    assert "no CUDA device" in json.loads(out.read_text())["skipped"]
