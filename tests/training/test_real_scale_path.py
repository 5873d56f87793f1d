"""What a real-scale run depends on, each reproduced at tiny size with the setting that matters:

bf16 under DeepSpeed, DDP with parts the loss never reaches, LoRA kept in fp32, non-finite steps skipped by
every rank alike, the stage-1 frame cache sharded over ranks and read from disk, checkpoints that hold what
trained (not the frozen LLM), stage 2 starting from the dev-selected stage-1 checkpoint, weight decay on
weight matrices only, EmoQ-Former gradient checkpointing, and a changed EmoQ-Former refused in stage 2.
The multi-process cases run the real CLI with 2 gloo processes (DeepSpeed on its CPU accelerator).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.corpora import make_tone_corpus, tiny_test_config
from support.environment import require_module, tail

from emoq.config import load_config
from emoq.models.stand_in import stand_in_overrides
from emoq.recipes import find_shipped, load_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": 8, "dev": 2, "test": 1})


def _launch(corpus: Path, out: Path, recipe: str, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`emoq run RECIPE --config emoq/tiny_test --nproc 2 ARGS` on the tone corpus, in a clean environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    cmd = [sys.executable, "-m", "emoq.cli", "run", recipe, "--config", "emoq/tiny_test", "--nproc", "2",
           f"data.root={corpus}", f"trainer.output_dir={out}", "stage2.init_from=null", "trainer.max_steps=3",
           "trainer.eval_every=100", *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{tail(err.stdout)}\n{tail(err.stderr)}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\nrc={proc.returncode}\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    return proc


def _state(out: Path, stage: str = "stage2") -> dict:
    return json.loads((out / stage / "final" / "trainer_state.json").read_text())


# ------------------------------------------------------------------ precision


@pytest.mark.slow
def test_deepspeed_bf16_keeps_the_emoq_former_and_lora_in_fp32(tones, tmp_path):
    """DeepSpeed's own bf16 mode casts every parameter to bf16: the fp32 EmoQ-Former then met bf16 weights
    (a dtype error at the first step) and LoRA trained without fp32 weights. Under emoq's autocast setting
    the frozen LLM is bf16 and everything that trains is fp32."""
    require_module("deepspeed", "pip install deepspeed")
    _launch(tones, tmp_path, "stage2_llm", "--accelerate-config", "zero2", "trainer.mixed_precision=bf16")
    dtypes = _state(tmp_path)["parameter_dtypes"]
    assert dtypes["qformer"] == {"trainable": ["float32"]}, dtypes
    assert dtypes["language_model"] == {"frozen": ["bfloat16"], "trainable": ["float32"]}, dtypes  # LLM ; LoRA


def test_lora_stays_fp32_on_a_bf16_llm(tones, tmp_path):
    from emoq.training.builders import build_model_and_processor

    model, _ = build_model_and_processor(tiny_test_config(tones, tmp_path, "trainer.mixed_precision=bf16"))
    adapters = {id(p) for p in model.adapter_parameters()}
    assert adapters and all(p.dtype == torch.float32 for p in model.adapter_parameters())
    base = {p.dtype for p in model.language_model.parameters() if id(p) not in adapters}
    assert base == {torch.bfloat16}
    assert {p.dtype for p in model.speech_encoder.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.qformer.parameters()} == {torch.float32}


# ------------------------------------------------------------------ DDP and unused parameters


@pytest.mark.slow
def test_ddp_audio_only_without_supcon_trains(tones, tmp_path):
    """Audio-only EmoQ builds the EmoQ-Former's transcript side and `supcon_weight: 0` leaves the contrastive
    head out of the loss; trainable, they stopped DDP at its second step."""
    proc = _launch(tones, tmp_path, "stage2_llm", "model.use_transcript=false", "data.use_transcript=false",
                   "loss.supcon_weight=0")
    assert _state(tmp_path)["step"] == 3
    assert "contrastive_head: frozen, the loss never reaches it" in proc.stderr + proc.stdout


def test_parts_outside_the_loss_are_frozen_and_a_trainable_part_without_gradient_is_named(tones, tmp_path):
    from emoq.training.recipe import freeze_outside_loss

    cfg = tiny_test_config(tones, tmp_path, "model.use_transcript=false", "loss.supcon_weight=0", "stage2.init_from=null")
    recipe = load_recipe("stage2_llm")
    state = recipe.setup(cfg)
    model = state.accelerator.unwrap_model(state.model)
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert "contrastive_head" in frozen
    assert not model.qformer.text_proj.weight.requires_grad and not model.qformer.layers[0].text_ffn.fc1.weight.requires_grad
    assert model.qformer.query_tokens.requires_grad and model.classifier[-1].weight.requires_grad
    # the LLM's token loss is part of stage 2 only: stage 1 freezes the projector and LoRA too
    freeze_outside_loss(model, cfg.loss, with_llm=False)
    assert not model.projector[0].weight.requires_grad if isinstance(model.projector, torch.nn.Sequential) \
        else not model.projector.weight.requires_grad
    assert not any(p.requires_grad for p in model.adapter_parameters())


def test_first_step_names_trainable_parameters_the_loss_never_reached(tones, tmp_path, caplog):
    recipe = load_recipe("stage1_qformer")
    state = recipe.setup(tiny_test_config(tones, tmp_path, "trainer.max_steps=1", "loss.supcon_weight=0"))
    model = state.accelerator.unwrap_model(state.model)
    model.contrastive_head.requires_grad_(True)  # what the recipe freezes, made trainable again
    with caplog.at_level("WARNING", logger="emoq.training"):
        recipe.train(state)
    assert any("received no gradient" in r.message and "contrastive_head" in r.message for r in caplog.records)


# ------------------------------------------------------------------ non-finite steps


NAN_PROBE = """
import json, torch
from pathlib import Path
from emoq.recipes.{module} import {cls}

class PoisonedOnRank1({cls}):
    def train(self, state, stop_after=None):
        forward, calls = state.model.forward, []
        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            if state.model.training:
                calls.append(1)
                if state.accelerator.process_index == 1 and len(calls) == 3:  # window 2 of 3, its 1st micro-batch
                    out.loss = out.loss * float("nan")
            return out
        state.model.forward = poisoned
        result = super().train(state, stop_after)
        opt = state.optimizer
        while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
            opt = opt.optimizer
        params = state.accelerator.unwrap_model(state.model).parameters()
        probe = {{"adam_steps": sorted({{int(s["step"]) for s in opt.state.values() if "step" in s}}),
                  "skipped": result.skipped_steps, "steps": result.step,
                  "finite": all(bool(torch.isfinite(p).all()) for p in params)}}
        rank = state.accelerator.process_index
        (Path(state.stage.output_dir) / f"nan_probe_{{rank}}.json").write_text(json.dumps(probe))
        return result

PoisonedOnRank1().main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("accelerate", ["ddp", "zero2"])
def test_a_nan_on_one_rank_skips_that_step_on_every_rank(tones, tmp_path, accelerate):
    """Accumulating 2 micro-batches, 3 steps; rank 1's loss is NaN in the first micro-batch of step 2. Every
    rank still runs backward (no collective left waiting), step 2 is skipped everywhere, steps 1 and 3 are
    applied: the optimiser holds 2 updates, not 3 (the poisoned window's half merged into the next) and not a
    hang."""
    if accelerate == "zero2":
        require_module("deepspeed", "pip install deepspeed")
    script = tmp_path / "poisoned.py"
    script.write_text(NAN_PROBE.format(module="stage1_qformer", cls="Stage1QFormer"))
    launch = [] if accelerate == "ddp" else ["--accelerate-config", accelerate]
    _launch(tones, tmp_path / "run", str(script), *launch, "trainer.gradient_accumulation_steps=2",
            "trainer.batch_size=2")
    probes = [json.loads((tmp_path / "run" / "stage1" / f"nan_probe_{rank}.json").read_text()) for rank in (0, 1)]
    for probe in probes:
        assert probe == {"adam_steps": [2], "skipped": 1, "steps": 3, "finite": True}, probes


# ------------------------------------------------------------------ sharded batches


@pytest.mark.parametrize("clips,batch", [(33, 4), (24, 16), (9, 4)])
def test_every_rank_gets_as_many_batches_as_the_sharded_loader_says(clips, batch):
    """accelerate shards the length-grouped batches over the ranks; a rank that gets fewer batches than the
    loader's length says ends its epoch early, the ranks then disagree on the step and the run stalls (33 clips
    in batches of 4 gave 4 batches per rank where the length said 5)."""
    from accelerate.data_loader import BatchSamplerShard

    from emoq.data.sampling import LengthGroupedBatchSampler

    sampler = LengthGroupedBatchSampler([1.0 + i % 5 for i in range(clips)], batch, seed=0)
    seen = set()
    for rank in (0, 1):
        shard = BatchSamplerShard(sampler, num_processes=2, process_index=rank, even_batches=True)
        batches = list(shard)
        assert len(batches) == len(shard) > 0, (rank, len(batches), len(shard))
        seen.update(i for b in batches for i in b)
    assert seen == set(range(clips))  # every clip is seen in the epoch


# ------------------------------------------------------------------ the stage-1 frame cache


@pytest.mark.slow
def test_frame_cache_is_encoded_once_across_ranks_and_read_from_disk(tones, tmp_path):
    """Each of the 2 ranks encodes half the clips into its own shard; training reads both shards."""
    proc = _launch(tones, tmp_path, "stage1_qformer", "stage1.cache_encoder_features=true")
    logs = proc.stdout + proc.stderr
    assert "rank 0: encoder frames of 12 clips cached" in logs and "rank 1: encoder frames of 12 clips cached" in logs
    shards = sorted((tmp_path / "stage1" / "encoder_frames").glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    keys = []
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys.append(set(f.keys()))
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 24


def test_frame_cache_reads_lazily_and_travels_to_workers(tones, tmp_path):
    import pickle

    from emoq.training.frame_cache import EncoderFrameCache

    path = tmp_path / "shard.safetensors"
    save_file({"a": torch.ones(3, 2), "b": torch.zeros(5, 2)}, path)
    cache = EncoderFrameCache([path])
    assert sorted(cache) == ["a", "b"] and cache._handles == {}  # nothing read yet
    assert torch.equal(cache["b"], torch.zeros(5, 2))
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker receives: no open file handle
    assert clone._handles == {} and torch.equal(clone["a"], torch.ones(3, 2))


# ------------------------------------------------------------------ checkpoints, dev selection


@pytest.fixture(scope="module")
def stand_in_run(tones, tmp_path_factory):
    """Stage 1 (2 steps) of the shipped MELD LoRA config on stand-in models; its overrides and output."""
    root = tmp_path_factory.mktemp("stand_in_run")
    name = "emoq/meld_whisper-large-v3_qwen2.5-7b_lora"
    overrides = [*stand_in_overrides(load_config(find_shipped(name)), root / "models"), f"data.root={tones}",
                 f"trainer.output_dir={root / 'out'}", "trainer.max_steps=2", "trainer.eval_every=1",
                 "trainer.mixed_precision=no", "trainer.gradient_accumulation_steps=1"]
    cfg = load_config(find_shipped(name), overrides)
    recipe = load_recipe("stage1_qformer")
    state = recipe.setup(cfg)
    recipe.cleanup(state, recipe.train(state))
    return name, overrides, cfg, state


def test_stage1_checkpoint_holds_what_trained_and_names_the_base_llm(stand_in_run):
    name, _, cfg, state = stand_in_run
    weights = Path(cfg.stage1.output_dir) / "final" / "weights"
    with safe_open(weights / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    llm_keys = [k for k in keys if k.startswith("language_model.")]
    assert llm_keys and all("lora_" in k for k in llm_keys), llm_keys[:5]  # LoRA only, no base weight
    assert any(k.startswith("qformer.") for k in keys)
    saved = json.loads((weights / "config.json").read_text())
    assert saved["base_llm"] == cfg.model.llm
    from emoq.models import EmoQForConditionalGeneration

    model = state.accelerator.unwrap_model(state.model).eval()
    reloaded = EmoQForConditionalGeneration.from_pretrained(weights).eval()
    batch = next(iter(state.dev))
    inputs = {k: batch[k] for k in ("input_features", "feature_attention_mask", "transcript_ids",
                                    "transcript_attention_mask")}
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).emotion_logits, model(**inputs).emotion_logits)
        torch.testing.assert_close(reloaded.language_model(input_ids=ids).logits,
                                   model.language_model(input_ids=ids).logits)


def test_stage2_starts_from_the_dev_selected_stage1_checkpoint(stand_in_run):
    name, overrides, cfg, _ = stand_in_run
    best = Path(cfg.stage1.output_dir) / "best" / "weights" / "model.safetensors"
    tensors = load_file(best)
    tensors["qformer.query_tokens"] = torch.full_like(tensors["qformer.query_tokens"], 0.5)  # mark best/
    save_file(tensors, best, metadata={"format": "pt"})
    state = load_recipe("stage2_llm").setup(load_config(find_shipped(name), [*overrides, "trainer.max_steps=1"]))
    queries = state.accelerator.unwrap_model(state.model).qformer.query_tokens
    assert torch.equal(queries.detach(), torch.full_like(queries, 0.5))


def test_stage2_refuses_an_emoq_former_other_than_stage1_trained(stand_in_run):
    name, overrides, _, _ = stand_in_run
    changed = load_config(find_shipped(name), [*overrides, "model.qformer.num_hidden_layers=3"])
    with pytest.raises(ValueError, match=r"model\.qformer\.num_hidden_layers is 3 here but stage 1 trained 2"):
        load_recipe("stage2_llm").setup(changed)


# ------------------------------------------------------------------ optimiser, gradient checkpointing


def test_weight_decay_applies_to_weight_matrices_only(tiny):
    from emoq.config import StageConfig
    from emoq.training.builders import build_optimizer

    model, _ = tiny(lora={"r": 4})
    model.train().requires_grad_(True)
    optimizer, _ = build_optimizer(model, StageConfig(learning_rate=1e-3), 0.01, 10, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "qformer.query_tokens" in undecayed and "qformer.text_positions.weight" in undecayed
    assert "qformer.layers.0.self_attention.norm.weight" in undecayed
    assert "qformer.layers.0.self_attention.q.bias" in undecayed
    assert "qformer.layers.0.self_attention.q.weight" in decayed
    assert any("lora_A" in n for n in decayed)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_emoq_former_gradient_checkpointing_recomputes_blocks_with_the_same_gradients(tiny):
    from emoq.models.emoq.qformer import EmoQFormerLayer

    def grads(checkpointing: bool):
        model, processor = tiny(seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        calls = []
        for layer in model.qformer.modules():
            if isinstance(layer, EmoQFormerLayer):
                layer.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(0)
        features = torch.randn(2, 80, 300)
        out = model(input_features=features, emotion_labels=torch.tensor([0, 1]))
        out.loss.backward()
        return calls, {n: p.grad.clone() for n, p in model.qformer.named_parameters() if p.grad is not None}

    plain_calls, plain = grads(False)
    ckpt_calls, ckpt = grads(True)
    assert len(ckpt_calls) == 2 * len(plain_calls) == 4  # 2 blocks, each recomputed in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)
