"""GPU checks at real model sizes with random weights (no download): bf16 training, QLoRA, throughput.

Two modes.

Model checks (the default)::

    python bench/gpu_check.py [--size small|real] [--steps 5] [--qlora]

- builds EmoQ with a Whisper-small-sized encoder and a Qwen2.5-0.5B-sized LLM (random weights,
  configs built in code), LoRA on the LLM, gradient checkpointing;
- trains a few steps in bf16 autocast: the loss must stay finite, the EmoQ-Former must stay fp32
  (bf16 overflow in attention), LoRA-B must move and the frozen encoder must not;
- measures training and label-scoring throughput on 3 s clips, and 3 s vs 30 s encoder cost;
- with --qlora (needs bitsandbytes + CUDA): loads the LLM in 4-bit nf4 and repeats the step check.
Prints one markdown table; `--size small` runs the same checks on CPU in seconds.

Shipped configs at real size (`--shipped`)::

    python bench/gpu_check.py --shipped [--configs NAME ...] [--steps 20] [--stand-in full|tiny] [--stage1]
                              [--json OUT.json] [--workdir DIR] [--peak-tflops X] [--time-budget S]
                              [--override KEY=VALUE ...]

Each shipped real-scale config (`SHIPPED`, most informative first) runs `--steps` optimiser steps through
the recipe code itself (`emoq.recipes.load_recipe(...).setup / train / cleanup`, in this process, one
device): stage 2 for EmoQ (`stage2.init_from=null`; with `--stage1`, stage 1 first and stage 2 from its
checkpoint), `train_baseline` for Qieemo and Patamia. The config is used as shipped (batch size,
accumulation, bf16, LoRA / 4-bit, gradient checkpointing, loss weights); only the model references change,
to stand-ins (`emoq.models.stand_in`: the published architectures with random weights, each saved in
the dtype its checkpoint is published in, so it loads as the real one does), plus the corpus, the output
folder, the step count, and no dev evaluation or checkpoint before the last step. The corpus is written
here: a MELD-layout or IEMOCAP-layout folder of generated 3-10 s clips with short transcripts.

`--stand-in full` (the default) needs CUDA; without it the mode says so and exits 0. `--stand-in tiny`
runs the very same flow on CPU with the tiny stand-ins (seconds per config), which is how the code path
is tested. Stand-ins and corpora are reused from `--workdir` (default: a temporary folder, removed at the
end); `--time-budget` starts no further config once that many seconds have passed; `--stand-in-dtype`
saves every full stand-in in one dtype instead of its checkpoint's. A failed run is recorded (`error`)
and the next config still runs; the exit status is then 1.

What is measured, per config and recipe (the JSON's `results[config][recipe]`, rewritten after each run):

- timing: the optimiser is wrapped so that each step's end (its `zero_grad`) is stamped, after a device
  synchronisation. The timed window runs from the end of step 1 to the end of the last step: model
  building, data scanning, the first step (allocator warm-up, kernel selection) and the dev evaluation
  and checkpoint after the last step are outside it. `step_time_s` and `samples_per_s` (training samples
  seen in the window, counted at the model's forward) come from that window; `setup_s` is the model
  building and `train_s` the whole `train` call, for reference;
- `peak_gpu_memory_gib`: `torch.cuda.max_memory_allocated`, reset after setup and read at the last step
  (weights, optimiser state, activations of the training steps); null on CPU;
- `mfu`: model FLOPs per second over the device's peak dense bf16 FLOP/s (`PEAK_BF16_DENSE`, by device
  name, or `--peak-tflops`; null on CPU or for an unknown device). Model FLOPs are counted per weight
  layer (every Linear, 4-bit Linear included, and Conv), with N its weight's parameters (the logical,
  unquantized count) and T the rows it processed in the step's forward passes (tokens, frames, query
  positions; counted by forward hooks, so every layer gets its own T):
  ~2·N·T for frozen layers that run forward only (the speech encoder, BERT),
  ~4·N·T for frozen layers that backprop passes through (forward + input-gradient backward: the LLM's
  base weights under LoRA, its LM head),
  6·N·T for trained parameters (forward + input and weight gradients: LoRA, the EmoQ-Former, projector,
  heads, fusion layers).
  Recomputation under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs), nor are
  the attention-score products, embedding look-ups, norms and activations, so the MFU is a slight
  underestimate. `tflops_per_step_by_kind` shows the three shares;
- `losses` (one per step), `loss_finite`, `steps`, `skipped_steps`, and, from the last checkpoint's
  `trainer_state.json`, `parameter_dtypes` (the dtypes training held, per part, trainable and frozen)
  and `num_processes`; `overrides` are the `key=value` overrides the run used.

Several GPUs: this bench runs one process. The same run on N GPUs is the recipe's own launch with the
recorded overrides and the same `--workdir` (stand-ins and corpus stay there), e.g.
`emoq run stage2_llm --config emoq/meld_whisper-large-v3_qwen2.5-7b_lora --nproc 8 --accelerate-config
zero2 <overrides>` (or `accelerate launch ... emoq/recipes/stage2_llm.py --config NAME <overrides>`);
its progress bar and the checkpoint's `trainer_state.json` then give the step rate and the dtypes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


def configs(size: str, vocab: int):
    from transformers import Qwen2Config

    from emoq.models.tiny import tiny_llama_config, tiny_whisper_config

    if size == "small":
        return tiny_whisper_config(), tiny_llama_config(vocab), {"hidden_size": 32, "num_hidden_layers": 2,
                                                                  "num_attention_heads": 4, "intermediate_size": 64}
    whisper = tiny_whisper_config(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072)
    qwen = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)
    qformer = {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 3072,
               "cross_attention_frequency": 2}
    return whisper, qwen, qformer


def build(size: str, device, quantization: str = "none"):
    from emoq.models import EmoQConfig, EmoQForConditionalGeneration, EmoQProcessor
    from emoq.models.tiny import tiny_tokenizer, whisper_feature_extractor

    tok = tiny_tokenizer()
    audio_cfg, text_cfg, qformer = configs(size, len(tok))
    processor = EmoQProcessor.for_encoder(whisper_feature_extractor(), tok, LABELS, audio_cfg, num_query_tokens=32)
    config = EmoQConfig(audio_config=audio_cfg, text_config=text_cfg, qformer_config=qformer, num_query_tokens=32,
                        audio_token_id=processor.audio_token_id, id2label=dict(enumerate(LABELS)),
                        lora={"r": 16, "lora_alpha": 32})
    if quantization == "none":
        model = EmoQForConditionalGeneration(config)
        model.speech_encoder.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        model.language_model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        return model.to(device), processor
    # QLoRA: save a random LLM, reload it 4-bit through from_components' real loading path
    from transformers import AutoModelForCausalLM

    tmp = tempfile.mkdtemp()
    AutoModelForCausalLM.from_config(text_cfg).save_pretrained(f"{tmp}/llm")
    from transformers import WhisperModel

    WhisperModel(audio_cfg).save_pretrained(f"{tmp}/enc")
    model = EmoQForConditionalGeneration.from_components(
        f"{tmp}/enc", f"{tmp}/llm", id2label=dict(enumerate(LABELS)), audio_token_id=processor.audio_token_id,
        qformer=qformer, lora={"r": 16, "lora_alpha": 32}, quantization=quantization, num_query_tokens=32,
        dtype=torch.bfloat16,
    )
    model.qformer.to(device)
    model.speech_encoder.to(device)
    model.projector.to(device, torch.float32)
    model.classifier.to(device)
    model.contrastive_head.to(device)
    return model, processor


def batch_for(processor, n: int, seconds: float, device, answers=True):
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32) for _ in range(n)]
    b = processor(clips, answers=[LABELS[i % 7] for i in range(n)] if answers else None)
    b = {k: v.to(device) for k, v in b.items()}
    if answers:
        b["emotion_labels"] = torch.arange(n, device=device) % 7
    return b


def train_check(model, processor, device, steps: int, batch: int) -> dict:
    model.train()
    model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    enc = {n: p.detach().clone() for n, p in model.speech_encoder.encoder.named_parameters()}
    b = batch_for(processor, batch, 3.0, device)
    losses, t0 = [], None
    for step in range(steps + 1):
        if step == 1:
            torch.cuda.synchronize() if device.type == "cuda" else None
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    torch.cuda.synchronize() if device.type == "cuda" else None
    elapsed = time.perf_counter() - t0
    params = dict(model.named_parameters())
    return {
        "losses finite": all(np.isfinite(losses)),
        "EmoQ-Former dtype": str(model.qformer.query_tokens.dtype).replace("torch.", ""),
        "LLM dtype": str(next(model.language_model.parameters()).dtype).replace("torch.", ""),
        "LoRA-B moved": all(not torch.equal(v, params[n]) for n, v in lora_b.items()),
        "encoder unchanged": all(torch.equal(v, dict(model.speech_encoder.encoder.named_parameters())[n])
                                 for n, v in enc.items()),
        "train samples/s (3 s clips)": round(steps * batch / elapsed, 2),
        "peak GPU memory GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }


@torch.no_grad()
def score_check(model, processor, device, batch: int) -> dict:
    model.eval()
    b = batch_for(processor, batch, 3.0, device, answers=False)
    run = lambda: model.score_labels(b["input_ids"], b["attention_mask"], b["input_features"],  # noqa: E731
                                     processor.label_candidates(), b["feature_attention_mask"])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        run()
        torch.cuda.synchronize() if device.type == "cuda" else None
        t = time.perf_counter()
        scores = run()
        torch.cuda.synchronize() if device.type == "cuda" else None
    return {"score_labels utterances/s": round(batch / (time.perf_counter() - t), 2),
            "scores finite": bool(torch.isfinite(scores).all())}


@torch.no_grad()
def encoder_length_check(model, device) -> dict:
    enc = model.speech_encoder.eval()
    dtype = next(enc.encoder.parameters()).dtype
    times = {}
    for seconds in (3, 30):
        mel = torch.randn(8, 80, seconds * 100, device=device, dtype=dtype)
        enc(mel)
        torch.cuda.synchronize() if device.type == "cuda" else None
        t = time.perf_counter()
        for _ in range(3):
            enc(mel)
        torch.cuda.synchronize() if device.type == "cuda" else None
        times[seconds] = (time.perf_counter() - t) / 3
    return {"encoder cost 3 s / 30 s": round(times[3] / times[30], 3)}


# ====================================================================== shipped configs at real size

#: the shipped real-scale configs, most informative first (the IEMOCAP EmoQ config has the MELD one's
#: model; only its corpus and label set differ)
SHIPPED = (
    "emoq/meld_whisper-large-v3_qwen2.5-7b_lora",
    "emoq/meld_whisper-large-v3_qwen2.5-7b_qlora",
    "qieemo/meld_whisper-large-v3",
    "patamia/iemocap_wav2vec2-large_bert-base",
    "emoq/iemocap_whisper-large-v3_qwen2.5-7b_lora",
)

#: peak dense (no sparsity) bf16 tensor FLOP/s by a substring of `torch.cuda.get_device_name()`; first match
#: wins, so more specific names come first. SXM parts unless named.
PEAK_BF16_DENSE = (
    ("H200", 989e12),  # GH200 too
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)

#: the dtype each checkpoint the shipped configs name is published in: a "full" stand-in is saved in it, so
#: that it loads (transformers keeps a checkpoint's saved dtype) as the real checkpoint does
PUBLISHED_DTYPES = {
    "openai/whisper-large-v3": torch.float16,
    "Qwen/Qwen2.5-7B-Instruct": torch.bfloat16,
    "facebook/wav2vec2-large-960h-lv60-self": torch.float32,
    "google-bert/bert-base-uncased": torch.float32,
}

_WORDS = ("the weather report said it would rain tomorrow I will take train at noon quick brown fox jumps "
          "over lazy dog describe tone of voice and feeling okay then you were on a break").split()


def _clip(rng, seconds: tuple[float, float], hz: float) -> np.ndarray:
    """A voiced-sounding clip: a tone with a slow pitch glide, syllable-rate bursts and noise."""
    t = np.arange(int(16000 * rng.uniform(*seconds))) / 16000
    glide = 1 + 0.05 * np.sin(2 * np.pi * 0.5 * t)
    bursts = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t)
    audio = 0.3 * np.sin(2 * np.pi * hz * glide * t) * bursts + 0.02 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def _sentence(rng) -> str:
    return " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 21)))).capitalize() + "."


def _fresh(root: Path, stamp: dict) -> bool:
    """Whether `root` already holds what `stamp` describes; if not, it is emptied for rewriting."""
    import shutil

    marker = root / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return True
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return False


def write_meld_corpus(root: Path, train: int, seconds: tuple[float, float], seed: int = 0) -> Path:
    """A MELD.Raw-layout corpus (the three CSVs, `dia{D}_utt{U}.wav` clips): `train` training clips,
    `train // 8` (at least 4) dev and 4 test clips, the seven MELD labels in turn."""
    import csv

    import soundfile as sf

    from emoq.data.meld import MELD_COLUMNS, MELD_SPLITS
    from emoq.labels import get_label_set

    counts = {"train": train, "dev": max(4, train // 8), "test": 4}
    stamp = {"layout": "meld", "counts": counts, "seconds": list(seconds), "seed": seed}
    if _fresh(root, stamp):
        return root
    rng = np.random.default_rng(seed)
    labels = get_label_set("meld7").labels
    sentiment = {"neutral": "neutral", "joy": "positive", "surprise": "positive"}
    for split, n in counts.items():
        csv_name, folder = MELD_SPLITS[split]
        (root / folder).mkdir(parents=True)
        with open(root / csv_name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(MELD_COLUMNS)
            for i in range(n):
                label, (dia, utt) = labels[i % len(labels)], divmod(i, 4)
                sf.write(root / folder / f"dia{dia}_utt{utt}.wav", _clip(rng, seconds, 120.0 + 60 * (i % 7)), 16000)
                writer.writerow([i + 1, _sentence(rng), f"Speaker{dia % 3}", label,
                                 sentiment.get(label, "negative"), dia, utt, 1, 1, "00:00:00,000", "00:00:10,000"])
    (root / "corpus.json").write_text(json.dumps(stamp), encoding="utf-8")
    return root


def write_iemocap_corpus(root: Path, train: int, seconds: tuple[float, float], seed: int = 0) -> Path:
    """An IEMOCAP_full_release-layout corpus (Session1-5: EmoEvaluation, transcriptions, sentences/wav):
    `train / 4` utterances per session (at least 8), coded neu / hap / exc / ang / sad in turn, so both the
    standard and Patamia's protocol find their classes; the training sessions' dev share is carved out by
    the reader."""
    import soundfile as sf

    per_session = max(8, -(-train // 4))
    stamp = {"layout": "iemocap", "per_session": per_session, "seconds": list(seconds), "seed": seed}
    if _fresh(root, stamp):
        return root
    rng = np.random.default_rng(seed)
    codes = ("neu", "hap", "exc", "ang", "sad")
    for session in range(1, 6):
        base, dialog = root / f"Session{session}", f"Ses{session:02d}F_impro01"
        for sub in ("dialog/EmoEvaluation", "dialog/transcriptions", f"sentences/wav/{dialog}"):
            (base / sub).mkdir(parents=True)
        evaluation, transcript, start = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""], [], 1.0
        for i in range(per_session):
            utt = f"{dialog}_{'FM'[i % 2]}{i:03d}"
            audio = _clip(rng, seconds, 120.0 + 60 * (i % 5))
            end = start + len(audio) / 16000
            sf.write(base / "sentences" / "wav" / dialog / f"{utt}.wav", audio, 16000)
            evaluation += [f"[{start:.4f} - {end:.4f}]\t{utt}\t{codes[i % 5]}\t[2.5000, 3.0000, 2.0000]", ""]
            transcript.append(f"{utt} [{start:08.4f}-{end:08.4f}]: {_sentence(rng)}")
            start = end + 1.0
        (base / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evaluation) + "\n")
        (base / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(transcript) + "\n")
    (root / "corpus.json").write_text(json.dumps(stamp), encoding="utf-8")
    return root


def stand_in_args(cfg, folder: Path, size: str, dtype: str = "published") -> list[str]:
    """The overrides that swap a config's model references for stand-ins. "tiny": `stand_in_overrides`
    (references and the widths that follow them). "full": the references only, each stand-in made on the
    GPU and saved in its checkpoint's published dtype, or in `dtype` when that names one (one folder per
    reference, shared by the configs)."""
    from emoq.models.stand_in import stand_in_overrides, write_stand_in

    if size == "tiny":
        return stand_in_overrides(cfg, folder, "tiny")
    m = cfg.model
    refs = {"model.encoder": m.encoder}
    if m.system == "emoq":
        refs["model.llm"] = m.llm
    if m.system == "patamia" and m.text_encoder and cfg.data.use_transcript:
        refs["model.text_encoder"] = m.text_encoder
    overrides = []
    for key, ref in refs.items():
        path = write_stand_in(ref, folder / f"full-{ref.replace('/', '--')}", "full",
                              dtype=PUBLISHED_DTYPES.get(ref) if dtype == "published" else getattr(torch, dtype),
                              device="cuda")
        overrides.append(f"{key}={path}")
    return overrides


class StepClock:
    """Stamps the end of every optimiser step (wrapping the optimiser's `zero_grad`, which the training loop
    calls once per step, applied or skipped) with the time, the training samples seen and the model FLOPs
    counted so far (see the module doc); `summary` reads the window from the first stamp to the last."""

    def __init__(self, model, optimizer, cuda: bool):
        self.cuda, self.optimizer = cuda, optimizer
        self.samples, self.tokens, self.macs = 0, 0, [0, 0, 0]  # macs: frozen forward-only, frozen + backprop, trained
        self.stamps: list[dict] = []
        self.in_forward = False
        self.handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                        model.register_forward_hook(self._leave)]
        for module in model.modules():
            per_output = _macs_per_output(module)
            if per_output:
                trained = any(p.requires_grad for p in module.parameters())
                self.handles.append(module.register_forward_hook(self._layer_hook(per_output, trained)))
        zero_grad = optimizer.zero_grad

        def stamped_zero_grad(*args, **kwargs):
            out = zero_grad(*args, **kwargs)
            self._stamp()
            return out

        optimizer.zero_grad = stamped_zero_grad
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        vars(self.optimizer).pop("zero_grad", None)

    def _enter(self, module, args, kwargs):
        # a training forward of the whole model; the layers' recomputation under gradient checkpointing runs
        # later, inside backward, and is not counted
        self.in_forward = module.training
        if not module.training:
            return
        labels = kwargs.get("emotion_labels")
        if labels is None:
            labels = next((v for k, v in kwargs.items() if k in ("input_features", "encoder_frames")), None)
        self.samples += int(labels.shape[0]) if labels is not None else 0
        if kwargs.get("input_ids") is not None and kwargs.get("attention_mask") is not None:
            self.tokens = self.tokens + kwargs["attention_mask"].sum()  # stays on the device until the stamp

    def _leave(self, module, args, output):
        self.in_forward = False

    def _layer_hook(self, per_output: int, trained: bool):
        def hook(module, args, output):
            if not self.in_forward or not isinstance(output, torch.Tensor):
                return
            macs = output.numel() * per_output
            self.macs[2 if trained else 1 if output.requires_grad else 0] += macs
        return hook

    def _stamp(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append({"time": time.perf_counter(), "samples": self.samples, "tokens": int(self.tokens),
                            "macs": list(self.macs),
                            "peak": torch.cuda.max_memory_allocated() if self.cuda else None})

    def summary(self, peak_flops: float | None) -> dict:
        if len(self.stamps) < 2:
            return {"timed_steps": 0, "samples_per_s": None, "mfu": None, "peak_gpu_memory_gib": None}
        first, last = self.stamps[0], self.stamps[-1]
        steps, seconds = len(self.stamps) - 1, last["time"] - first["time"]
        samples = last["samples"] - first["samples"]
        macs = [b - a for a, b in zip(first["macs"], last["macs"])]
        by_kind = {"frozen_forward_only": 2 * macs[0], "frozen_backprop_through": 4 * macs[1], "trained": 6 * macs[2]}
        flops = sum(by_kind.values())
        tokens = last["tokens"] - first["tokens"]
        return {
            "timed_steps": steps,
            "step_time_s": round(seconds / steps, 4),
            "samples_per_s": round(samples / seconds, 3),
            "llm_tokens_per_sample": round(tokens / samples, 1) if tokens and samples else None,
            "tflops_per_step": _significant(flops / steps / 1e12),
            "tflops_per_step_by_kind": {k: _significant(v / steps / 1e12) for k, v in by_kind.items()},
            "mfu": round(flops / seconds / peak_flops, 4) if peak_flops else None,
            "peak_gpu_memory_gib": round(last["peak"] / 2**30, 2) if last["peak"] is not None else None,
        }


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _macs_per_output(module) -> int:
    """Multiply-accumulates per output element of a weight layer (0 for anything else): a Linear's input
    width (also for bitsandbytes' 4-bit Linear, whose packed weight has fewer elements), a Conv's input
    channels per group times its kernel size."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * int(np.prod(module.kernel_size))
    return 0


def peak_flops_for(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((value for key, value in PEAK_BF16_DENSE if key.lower() in name), None)


def _release(cuda: bool) -> None:
    """Drop what a finished run left: accelerate's process-wide state (each run builds its own
    Accelerator), unreachable models, cached device memory."""
    import gc

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def measure_recipe(recipe_name: str, cfg, device: torch.device, peak_flops: float | None) -> dict:
    """One recipe run (setup -> train -> cleanup) with its steps timed; an error is recorded, not raised."""
    import traceback

    from emoq.recipes import load_recipe

    cuda = device.type == "cuda"
    recipe, state, clock = load_recipe(recipe_name), None, None
    _release(cuda)
    t = cfg.trainer
    out = {"recipe": recipe_name, "batch_size": t.batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
           "mixed_precision": t.mixed_precision,
           # what an earlier run left allocated (it would count in this run's peak): 0 when it was released
           "gpu_memory_at_start_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None}
    try:
        start = time.perf_counter()
        state = recipe.setup(cfg)
        out["setup_s"] = round(time.perf_counter() - start, 1)
        clock = StepClock(state.accelerator.unwrap_model(state.model), state.optimizer, cuda)
        start = time.perf_counter()
        try:
            result = recipe.train(state)
        finally:
            clock.detach()
        out["train_s"] = round(time.perf_counter() - start, 1)
        recipe.cleanup(state, result)
        recorded = json.loads((Path(state.stage.output_dir) / "final" / "trainer_state.json").read_text())
        out.update(clock.summary(peak_flops))
        out.update({
            "steps": result.step,
            "skipped_steps": result.skipped_steps,
            "losses": [round(v, 5) for v in result.losses],
            "loss_finite": bool(result.losses) and all(np.isfinite(result.losses)),
            "parameter_dtypes": recorded.get("parameter_dtypes"),
            "num_processes": recorded.get("num_processes"),
        })
    except Exception as err:  # noqa: BLE001 - one failed config must not stop the others
        traceback.print_exc()
        out["error"] = f"{type(err).__name__}: {err}"[:2000]
    finally:
        if state is not None:
            state.accelerator.free_memory()
        state = clock = None
        _release(cuda)
    return out


def run_shipped(args) -> int:
    """The `--shipped` mode; returns the exit status (1 when a run failed)."""
    import logging
    import shutil

    from emoq.config import load_config
    from emoq.recipes import find_shipped

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    if args.stand_in == "full" and not cuda:
        message = ("no CUDA device: the real-size run (--stand-in full) needs a GPU and is skipped; "
                   "--stand-in tiny runs the same flow on CPU")
        print(message)
        if args.json:
            Path(args.json).write_text(json.dumps({"mode": "shipped", "skipped": message}, indent=2) + "\n")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    peak_flops = peak_flops_for(device, args.peak_tflops)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="emoq-gpu-check-")).resolve()
    report = {"mode": "shipped", "stand_in": args.stand_in, "steps": args.steps, "stage1": args.stage1,
              "device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "peak_bf16_tflops": peak_flops / 1e12 if peak_flops else None,
              "torch": torch.__version__, "results": {}}

    def save() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")

    started, failed = time.perf_counter(), False
    try:
        for name in args.configs:
            if args.time_budget and time.perf_counter() - started > args.time_budget:
                report["results"][name] = {"skipped": f"time budget of {args.time_budget:.0f} s spent"}
                save()
                continue
            runs = report["results"][name] = {}
            try:
                cfg = load_config(find_shipped(name))
                write = {"meld": write_meld_corpus, "iemocap": write_iemocap_corpus}[cfg.data.dataset]
                corpus = write(workdir / "corpora" / cfg.data.dataset, args.clips, tuple(args.seconds))
                models = stand_in_args(cfg, workdir / "stand_ins", args.stand_in, args.stand_in_dtype)
            except Exception as err:  # noqa: BLE001
                runs["error"] = f"{type(err).__name__}: {err}"[:2000]
                failed = True
                save()
                continue
            _release(cuda)  # the stand-ins were made on the device
            output = workdir / "runs" / name.replace("/", "--")
            shutil.rmtree(output, ignore_errors=True)  # a previous run's checkpoints would be resumed
            overrides = [*models, f"data.root={corpus}", f"trainer.output_dir={output}",
                         f"trainer.max_steps={args.steps}", "trainer.eval_every=1000000000",
                         "trainer.save_every=1000000000", f"trainer.log_every={args.steps}", *args.override]
            if cfg.model.system == "emoq":
                recipes = ["stage1_qformer", "stage2_llm"] if args.stage1 else ["stage2_llm"]
                overrides += [] if args.stage1 else ["stage2.init_from=null"]
            else:
                recipes = ["train_baseline"]
            for recipe in recipes:
                print(f"== {name}: {recipe}", flush=True)
                run = measure_recipe(recipe, load_config(find_shipped(name), overrides), device, peak_flops)
                runs[recipe] = {**run, "overrides": overrides}
                save()
                if "error" in run:
                    failed = True
                    break
            if args.workdir is None:
                shutil.rmtree(output, ignore_errors=True)
    finally:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        save()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_shipped_table(report)
    return 1 if failed else 0


def print_shipped_table(report: dict) -> None:
    print(f"device: {report['device']}, peak bf16 TFLOP/s: {report['peak_bf16_tflops']}, "
          f"stand-ins: {report['stand_in']}, wall: {report.get('wall_s')} s")
    cols = ("samples_per_s", "step_time_s", "tflops_per_step", "mfu", "peak_gpu_memory_gib", "loss_finite", "steps",
            "setup_s")
    print("| config | recipe | " + " | ".join(cols) + " | error |")
    print("|---" * (len(cols) + 3) + "|")
    for name, runs in report["results"].items():
        if "error" in runs or "skipped" in runs:
            print(f"| {name} | - |" + " |" * len(cols) + f" {runs.get('error') or runs.get('skipped')} |")
            continue
        for recipe, run in runs.items():
            cells = " | ".join(str(run.get(c)) for c in cols)
            print(f"| {name} | {recipe} | {cells} | {run.get('error', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "real"], default="real", help="model checks: model size")
    parser.add_argument("--steps", type=int, default=None, help="training steps (model checks: 5, --shipped: 20)")
    parser.add_argument("--batch", type=int, default=8, help="model checks: batch size")
    parser.add_argument("--qlora", action="store_true", help="model checks: repeat the step check in 4-bit")
    shipped = parser.add_argument_group("shipped configs at real size")
    shipped.add_argument("--shipped", action="store_true", help="run the shipped real-scale configs instead")
    shipped.add_argument("--configs", nargs="+", default=list(SHIPPED), metavar="NAME",
                         help="shipped config names (default: all five, most informative first)")
    shipped.add_argument("--stand-in", choices=["full", "tiny"], default="full",
                         help="full: published sizes (needs CUDA); tiny: the same flow on CPU")
    shipped.add_argument("--stand-in-dtype", choices=["published", "bfloat16", "float32"], default="published",
                         help="full: the dtype the stand-ins are saved (and so loaded) in")
    shipped.add_argument("--stage1", action="store_true", help="EmoQ: run stage 1 too, and stage 2 from it")
    shipped.add_argument("--json", help="write the results here (rewritten after every run)")
    shipped.add_argument("--workdir", help="keep stand-ins, corpora and run folders here (default: temporary)")
    shipped.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, for MFU")
    shipped.add_argument("--time-budget", type=float, metavar="S", help="start no config after S seconds")
    shipped.add_argument("--clips", type=int, default=64, help="training clips of the generated corpus")
    shipped.add_argument("--seconds", type=float, nargs=2, default=(3.0, 10.0), metavar=("MIN", "MAX"),
                         help="clip lengths of the generated corpus")
    shipped.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                         help="further config overrides for every run (e.g. data.num_workers=4)")
    args = parser.parse_args()
    if args.shipped:
        args.steps = 20 if args.steps is None else args.steps
        if args.steps < 2:
            parser.error("--shipped needs --steps >= 2 (the first step is not timed)")
        raise SystemExit(run_shipped(args))
    args.steps = 5 if args.steps is None else args.steps
    run_model_checks(args)


def run_model_checks(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, processor = build(args.size, device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "size": args.size}
    results.update(train_check(model, processor, device, args.steps, args.batch))
    results.update(score_check(model, processor, device, args.batch))
    results.update(encoder_length_check(model, device))
    if args.qlora:
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
        qmodel, processor = build(args.size, device, quantization="4bit")
        q = train_check(qmodel, processor, device, args.steps, args.batch)
        results.update({f"QLoRA {k}": v for k, v in q.items()})
    print("| check | value |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
