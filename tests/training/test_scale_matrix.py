"""The shipped real-scale configs, run with the settings they ship, at tiny size, on CPU.

Each case loads a shipped paper-scale config and changes only the model references — to stand-in folders
of the same families written in code (Whisper encoder, Qwen2 LLM, wav2vec2 encoder, BERT; see
`emoq.models.stand_in`) — and the widths that follow from them. Everything else is as shipped: mixed
precision, LoRA targets, 4-bit quantization, transcript use, loss weights, gradient accumulation, gradient
checkpointing, and the accelerate / DeepSpeed config named. Each recipe of the config runs 3 optimiser
steps with 2 gloo processes (DeepSpeed on its CPU accelerator), in bf16 as shipped and in fp32, and the
result is reloaded for one `emoq eval` batch.

`make test` runs the slice marked below (one case per config and per accelerate config, both precisions
appear); `make test-scale` runs the whole matrix (`EMOQ_SCALE_MATRIX=full`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.corpora import make_tone_corpus
from support.distributed import check_adapter, check_zero_state
from support.environment import require_module, tail
from support.media import build_iemocap_tree

from emoq.config import load_config
from emoq.models.stand_in import stand_in_overrides
from emoq.recipes import find_shipped

REPO = Path(__file__).resolve().parents[2]

#: each shipped real-scale config: its recipes, its corpus layout, and the accelerate configs it is meant for
SHIPPED = {
    "emoq/meld_whisper-large-v3_qwen2.5-7b_lora": (("stage1_qformer", "stage2_llm"), "meld", ("ddp", "zero2", "zero3")),
    "emoq/iemocap_whisper-large-v3_qwen2.5-7b_lora": (("stage1_qformer", "stage2_llm"), "iemocap",
                                                       ("ddp", "zero2", "zero3")),
    # QLoRA is the one-GPU recipe; DDP over several GPUs works too. ZeRO partitions parameters and states that
    # bitsandbytes packs into its own 4-bit layout, which DeepSpeed cannot shard: not a combination to ship.
    "emoq/meld_whisper-large-v3_qwen2.5-7b_qlora": (("stage1_qformer", "stage2_llm"), "meld", ("single_gpu", "ddp")),
    "qieemo/meld_whisper-large-v3": (("train_baseline",), "meld", ("ddp", "zero2", "zero3")),
    "patamia/iemocap_wav2vec2-large_bert-base": (("train_baseline",), "iemocap", ("ddp", "zero2", "zero3")),
}
PRECISIONS = ("bf16", "fp32")

#: the slice `make test` runs: every config, every accelerate config and both precisions appear at least once
SLICE = {
    ("emoq/meld_whisper-large-v3_qwen2.5-7b_lora", "zero2", "bf16"),
    ("emoq/meld_whisper-large-v3_qwen2.5-7b_qlora", "single_gpu", "bf16"),
    ("emoq/iemocap_whisper-large-v3_qwen2.5-7b_lora", "zero3", "bf16"),
    ("qieemo/meld_whisper-large-v3", "ddp", "bf16"),
    ("patamia/iemocap_wav2vec2-large_bert-base", "zero2", "fp32"),
}
FULL = os.environ.get("EMOQ_SCALE_MATRIX") == "full"


def _cases():
    for name, (_, _, accelerate_configs) in SHIPPED.items():
        for accelerate in accelerate_configs:
            for precision in PRECISIONS:
                marks = [] if (name, accelerate, precision) in SLICE else [pytest.mark.scale]
                yield pytest.param(name, accelerate, precision, marks=marks, id=f"{name}-{accelerate}-{precision}")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return {"meld": make_tone_corpus(root / "meld", {"train": 8, "dev": 2, "test": 1}),
            "iemocap": build_iemocap_tree(root / "iemocap")}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return tmp_path_factory.mktemp("stand_ins")


def _environment() -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{tail(err.stdout)}\n{tail(err.stderr)}")
    print(f"{time.monotonic() - start:.0f}s: {' '.join(cmd[3:6])}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\nrc={proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    return proc


def scale_shaped_overrides(name: str, corpus: Path, stand_ins: Path, out: Path, precision: str) -> list[str]:
    """The stand-in twin of a shipped config: model references and model widths, the corpus, the output folder,
    3 steps — and fp32 when asked (the shipped precision otherwise)."""
    cfg = load_config(find_shipped(name))
    overrides = [*stand_in_overrides(cfg, stand_ins), f"data.root={corpus}", f"trainer.output_dir={out}",
                 "trainer.max_steps=3", "trainer.eval_every=3", "trainer.log_every=1"]
    if precision == "fp32":
        overrides.append("trainer.mixed_precision=no")
    return overrides


@pytest.mark.slow
@pytest.mark.parametrize("name,accelerate,precision", list(_cases()))
def test_shipped_config_trains_with_its_own_settings(name, accelerate, precision, corpora, stand_ins, tmp_path):
    recipes, corpus_kind, _ = SHIPPED[name]
    if accelerate.startswith("zero"):
        require_module("deepspeed", "pip install deepspeed")
    shipped = load_config(find_shipped(name))
    overrides = scale_shaped_overrides(name, corpora[corpus_kind], stand_ins, tmp_path, precision)
    nproc = 1 if accelerate == "single_gpu" else 2
    launch = ["--nproc", str(nproc)]
    if accelerate.startswith("zero"):
        launch += ["--accelerate-config", str(_deepspeed_at_tiny_size(accelerate, tmp_path))]
        overrides.append("trainer.save_every=2")  # a resumable checkpoint, whose optimiser shards prove ZeRO ran
    for recipe in recipes:
        _run([sys.executable, "-m", "emoq.cli", "run", recipe, "--config", name, *launch, *overrides], timeout=600)
    stage = {"train_baseline": "baseline", "stage1_qformer": "stage1", "stage2_llm": "stage2"}[recipes[-1]]
    last = load_config(find_shipped(name), overrides)
    folder = Path(getattr(last, "stage2" if stage == "stage2" else "stage1").output_dir)
    state = json.loads((folder / "final" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["num_processes"] == nproc and state["skipped_steps"] == 0, state
    dtypes = state["parameter_dtypes"]
    trainable = {d for kinds in dtypes.values() for d in kinds.get("trainable", [])}
    assert trainable == {"float32"}, dtypes  # whatever trains keeps fp32 weights, under DeepSpeed too
    if shipped.model.system == "emoq":
        assert dtypes["qformer"]["trainable"] == ["float32"], dtypes
        frozen_llm = dtypes["language_model"]["frozen"]
        if shipped.model.quantization == "4bit":
            assert "uint8" in frozen_llm, dtypes  # bitsandbytes' packed 4-bit weights
        else:
            assert frozen_llm == (["bfloat16"] if precision == "bf16" else ["float32"]), dtypes
    if accelerate.startswith("zero"):
        check_zero_state(folder / "checkpoint-2" / "state", stage=int(accelerate[-1]), ranks=nproc)
    if stage == "stage2":
        check_adapter(folder / "best" / "weights")
    metrics = _eval(folder / "best", last, corpus_kind, corpora[corpus_kind], tmp_path / "eval")
    assert metrics["rows_ok"] == metrics["rows_total"] > 0, metrics


def _deepspeed_at_tiny_size(name: str, folder: Path) -> Path:
    """The shipped accelerate + DeepSpeed config, with ZeRO-3's persistence threshold (parameters smaller than
    it are not partitioned) scaled down with the model: at the shipped 1e5 elements no tiny parameter would be
    partitioned, and the run would not exercise what ZeRO-3 does to a 7B model's parameters."""
    import yaml

    shipped_yaml = find_shipped(f"accelerate/{name}")
    accelerate = yaml.safe_load(shipped_yaml.read_text())
    ds = json.loads(find_shipped(f"deepspeed/{name}").read_text())
    if "stage3_param_persistence_threshold" in ds["zero_optimization"]:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (folder / f"{name}.json").write_text(json.dumps(ds))
    accelerate["deepspeed_config"]["deepspeed_config_file"] = str(folder / f"{name}.json")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(accelerate))
    return path


def _eval(model: Path, cfg, corpus_kind: str, corpus: Path, out: Path) -> dict:
    """One `emoq eval` batch on the reloaded dev-selected checkpoint (IEMOCAP: the held-out session)."""
    cmd = [sys.executable, "-m", "emoq.cli", "eval", "--model", str(model), "--dataset", corpus_kind,
           "--root", str(corpus), "--split", "test", "--label-set", cfg.data.label_set, "--out", str(out),
           "--batch-size", "16"]
    _run(cmd, timeout=300)
    return json.loads((out / "metrics.json").read_text())
