"""`emoq estimate-memory`: the estimate against the peak memory a real training step holds on CPU (tiny
configs, the recipes' own setup and steps), its arithmetic against hand-computed numbers, the shipped
paper-scale configs (QLoRA on one 24 GB GPU, LoRA under ZeRO-2 on 80 GB GPUs) and the command itself."""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from support.corpora import make_tone_corpus

from emoq.config import load_config
from emoq.recipes import find_shipped, load_recipe
from emoq.training.loop import model_inputs
from emoq.training.memory import GiB, Launch, Workload, _quantized_bytes, estimate, estimate_run

LORA = "emoq/meld_whisper-large-v3_qwen2.5-7b_lora"
QLORA = "emoq/meld_whisper-large-v3_qwen2.5-7b_qlora"


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    """Tone clips of 0.9-1.0 s with the transcript "okay then" (MELD layout)."""
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": 8, "dev": 2})


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    return tmp_path_factory.mktemp("stand_ins")


def _config(name, corpus, out, stand_ins, *overrides):
    """A shipped config on the tone corpus, single process, fp32, stage 2 from a fresh EmoQ-Former; a
    real-scale config becomes its tiny stand-in twin (same families, precision rules, LoRA, checkpointing)."""
    shipped = load_config(find_shipped(name))
    twin = []
    if not shipped.model.tiny_random:
        from emoq.models.stand_in import stand_in_overrides

        twin = stand_in_overrides(shipped, stand_ins, "tiny")
    return load_config(find_shipped(name), [*twin, f"data.root={corpus}", f"trainer.output_dir={out}",
                                            "trainer.mixed_precision='no'", "stage2.init_from=null", *overrides])


def measure_training_peak(cfg, recipe_name: str, steps: int = 3) -> tuple[int, object]:
    """Bytes a training step really holds at its peak, on CPU: the model's weights and buffers (allocated before
    profiling, so measured from their storages) plus the peak, over the profiled steps, of the CPU allocator's
    bytes allocated since profiling began: gradients, optimizer states, activations, temporaries and the batch.
    The loop is the training loop's own step (forward, backward, clipping, AdamW, scheduler, zero_grad). Each
    batch is copied before its step, as a GPU run copies it to the device; the collator's tensors wrap NumPy
    memory, which the allocator does not see."""
    from torch.profiler import ProfilerActivity, profile, record_function

    recipe = load_recipe(recipe_name)
    state = recipe.setup(cfg)
    model, optimizer = state.model, state.optimizer
    model.train()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    batches = iter(state.loader)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in next(batches).items()}
            with record_function("train_step"):
                out = model(**model_inputs(batch))
                state.accelerator.backward(out.loss)
                state.accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                state.scheduler.step()
                optimizer.zero_grad()
            del out
    trace = cfg.trainer.output_dir + "/memory_trace.json"
    prof.export_chrome_trace(trace)
    with open(trace, encoding="utf-8") as f:
        events = json.load(f)["traceEvents"]
    os.unlink(trace)
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "train_step" and e.get("ph") == "X"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    # the allocator's counter carries what earlier profiling sessions allocated and is still alive: start from it
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    peak = max(e["args"]["Total Allocated"] for e in memory if any(a <= e["ts"] <= b for a, b in spans)) - start
    return sum(storages.values()) + peak, state


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, fixed at the first mixed precision it sees: start each run
    from none and leave none behind, so a bf16 run and the fp32 runs of other tests can share the process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


CASES = [
    pytest.param("emoq/tiny_test", "stage2_llm", "stage2", (), id="tiny_test-stage2"),
    pytest.param("emoq/tiny_test", "stage1_qformer", "stage1", (), id="tiny_test-stage1"),
    pytest.param(LORA, "stage2_llm", "stage2", (), id="lora-twin-stage2-checkpointing"),
    pytest.param(LORA, "stage2_llm", "stage2", ("model.gradient_checkpointing=false",), id="lora-twin-stage2"),
    pytest.param(LORA, "stage1_qformer", "stage1", ("stage1.cache_encoder_features=false",), id="lora-twin-stage1"),
    # as shipped: bf16 frozen encoder and LLM, autocast (bf16 copies of what the matmuls keep), fp32 logits
    pytest.param(LORA, "stage2_llm", "stage2", ("trainer.mixed_precision=bf16",), id="lora-twin-stage2-bf16"),
]


@pytest.mark.parametrize("name, recipe, stage, overrides", CASES)
def test_estimate_is_within_25_percent_of_the_measured_training_peak(name, recipe, stage, overrides, tones,
                                                                      stand_ins, tmp_path, fresh_accelerator_state):
    cfg = _config(name, tones, tmp_path, stand_ins, "trainer.batch_size=4", *overrides)
    measured, state = measure_training_peak(cfg, recipe)
    model = state.accelerator.unwrap_model(state.model)
    transcript = len(state.processor.tokenizer("okay then", add_special_tokens=False)["input_ids"])
    # the estimate for what the corpus holds: clips of at most 1 s, transcripts of `transcript` tokens
    est = estimate(cfg, stage, Launch(device="cpu"), Workload(audio_seconds=1.0, transcript_tokens=transcript))
    # the meta model is the model the recipe trains: same parameters, same trainable ones
    assert est.params["total"] == sum(p.numel() for p in model.parameters())
    assert est.params["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ratio = est.total / measured
    assert 0.75 <= ratio <= 1.25, (f"estimate {est.total / 2**20:.2f} MiB vs measured {measured / 2**20:.2f} MiB "
                                   f"(ratio {ratio:.2f}); {est.breakdown}")


def test_arithmetic_matches_hand_computed_numbers_for_a_small_model():
    cfg = load_config(find_shipped("emoq/tiny_test"), ["stage2.init_from=null"])
    single = estimate(cfg, "stage2", Launch())
    trainable, frozen = single.params["trainable"], single.params["total"] - single.params["trainable"]
    # fp32 everywhere: 4 bytes a weight; one fp32 gradient each; AdamW's two moments + foreach's temporary
    assert single.trainable_weights == 4 * trainable and single.frozen_weights == 4 * frozen
    assert single.gradients == 4 * trainable
    assert single.optimizer_states == (8 + 4) * trainable
    ddp = estimate(cfg, "stage2", Launch(num_processes=2))
    assert ddp.gradients == 2 * 4 * trainable  # DDP's buckets: a second copy of every gradient
    assert ddp.optimizer_states == single.optimizer_states and ddp.activations == single.activations

    def zero(stage, processes, **kwargs):
        return estimate(cfg, "stage2", Launch(num_processes=processes, zero_stage=stage, reduce_bucket_size=1000,
                                              **kwargs))

    zero2 = zero(2, 8)
    # ZeRO-2 over 8: fp32 master weights + moments (12 bytes) and the step's fp32 gradient shard and AdamW
    # temporary (8 bytes) are split 8 ways; the gradients too, plus one reduce bucket of 1000 fp32 elements
    assert zero2.optimizer_states == pytest.approx((12 + 8) * trainable / 8)
    assert zero2.gradients == pytest.approx(4 * trainable / 8 + 1000 * 4)
    assert zero2.frozen_weights == single.frozen_weights and zero2.trainable_weights == single.trainable_weights
    assert zero(2, 1).optimizer_states == pytest.approx(8 * zero2.optimizer_states)
    # ZeRO-3 shards the weights too; weights under the persistence threshold stay whole (all of a tiny model's)
    assert zero(3, 8, param_persistence_threshold=0).trainable_weights == pytest.approx(4 * trainable / 8)
    assert zero(3, 8).trainable_weights == single.trainable_weights
    # the LM head at the loss: fp32 logits (kept by the output), their log-softmax, and the final norm's input
    n, vocab, hidden = 4 * single.inputs["sequence_length"], 401, 48
    assert single.breakdown["LM head and loss"] == n * hidden * 4 + 2 * n * vocab * 4


def test_nf4_bytes_are_half_a_byte_per_weight_plus_the_double_quantised_scales():
    linear = torch.nn.Linear(4096, 4096, bias=False, device="meta")
    n = 4096 * 4096
    blocks = n // 64  # one 8-bit absmax per block of 64; one fp32 absmax per 256 blocks; two code tables
    assert _quantized_bytes(linear, "4bit") == n // 2 + blocks + 4 * (blocks // 256) + 4 * (256 + 16 + 1)
    assert _quantized_bytes(linear, "8bit") == n + 4 * 4096


def test_shipped_qlora_fits_one_24gb_gpu_and_lora_under_zero2_fits_80gb_gpus():
    reserve = 1.5 * GiB  # CUDA context and allocator reserve, which the estimate leaves out
    (qlora,) = estimate_run(load_config(find_shipped(QLORA)), ("stage2",), Launch(num_processes=1))
    assert qlora.total + reserve < 24 * GiB, qlora.total / GiB
    assert qlora.inputs["quantization"] == "4bit" and qlora.inputs["lora_r"] == 16
    lora_cfg = load_config(find_shipped(LORA))
    (eight,) = estimate_run(lora_cfg, ("stage2",), Launch.from_deepspeed_config(
        json.loads(find_shipped("deepspeed/zero2").read_text()), num_processes=8))
    (sixteen,) = estimate_run(lora_cfg, ("stage2",), Launch.from_deepspeed_config(
        json.loads(find_shipped("deepspeed/zero2").read_text()), num_processes=16))
    assert eight.total + reserve < 80e9, eight.total / GiB
    assert sixteen.optimizer_states == pytest.approx(eight.optimizer_states / 2) and sixteen.total < eight.total
    # exact counts from the published architectures: Qwen2.5-7B-Instruct's 7.62B frozen weights in bf16
    llm = eight.params["by_module"]["language_model"]
    assert llm["total"] - llm["trainable"] == 7_615_616_512
    assert eight.frozen_weights > 2 * 7_615_616_512 and qlora.frozen_weights < eight.frozen_weights


def test_cli_prints_json_with_trailing_overrides(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "emoq.cli", "estimate-memory", QLORA, "--nproc", "1", "--accelerate-config",
         "single_gpu", "--stage", "2", "--json", "trainer.batch_size=2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    (stage2,) = json.loads(out.stdout)["estimates"]
    assert stage2["stage"] == "stage2" and stage2["inputs"]["batch_size"] == 2
    assert stage2["inputs"]["processes"] == 1 and stage2["inputs"]["zero_stage"] is None
    assert 0 < stage2["total_gib"] < 24


def test_cli_table_reads_the_zero_stage_from_the_accelerate_config(capsys):
    from emoq.cli.parser import main

    assert main(["estimate-memory", "emoq/tiny_test", "--nproc", "8", "--accelerate-config", "zero2",
                 "--stage", "2", "trainer.batch_size=2"]) == 0
    text = capsys.readouterr().out
    assert "DeepSpeed ZeRO-2, 8 processes" in text and "total per GPU" in text and "stage2" in text
    with pytest.raises(SystemExit):
        main(["estimate-memory", "emoq/tiny_test", "--stage", "2", "not-an-override"])
    with pytest.raises(SystemExit, match="no stage 2"):
        main(["estimate-memory", "qieemo/tiny_test", "--stage", "2"])
