"""Per-GPU memory of a training run, worked out from its run config (`emoq estimate-memory`).

The model is built on the `meta` device from the configs of its parts (no weights are read), with LoRA
injected by peft and the trainable parts marked as each recipe marks them, so parameter counts are exact.
Each parameter is held in the dtype the run holds it in:

- the frozen speech encoder and LLM in bf16 under `trainer.mixed_precision: bf16` (`frozen_dtype` of the
  builders), else as their checkpoints are stored (stage 2 reloads the encoder from the stage-1 folder in
  fp32); whatever trains (EmoQ-Former, heads, projector, LoRA, the layer mix) in fp32;
- `model.quantization: 4bit`: the LLM's linear layers in nf4 with double quantisation (block 64), every
  other LLM weight in fp32 (peft's `prepare_model_for_kbit_training` casts them); `8bit`: int8 + row scales.

Per process, the estimate holds:

- weights: frozen and trainable, whole on every process (ZeRO-3: sharded, plus the gathered working set);
- gradients: one per trainable weight, in its dtype; DDP adds its gradient buckets (a second copy), ZeRO-2/3
  keep this process's shard plus the reduce bucket(s) of the DeepSpeed config;
- optimizer states: AdamW's two moments (under DeepSpeed also fp32 master weights; sharded by ZeRO), plus the
  temporaries of the optimizer step;
- activations: what autograd keeps for the backward pass and the temporaries alive with it, worked out
  tensor by tensor from the shapes of one micro-batch (`trainer.batch_size` clips of `data.max_seconds`,
  the LLM prompt: chat template + soft prompts + transcript + answer): the frozen encoder's hidden states,
  the EmoQ-Former's and the LLM's saved tensors (only each block's input under gradient checkpointing,
  plus one recomputed block in backward), the logits, their log-softmax and its gradients.

The total is the peak of a training step, over the forward pass, the backward pass (where activations are
freed while gradients appear) and the optimizer step: it is below the sum of the columns, which do not all
peak at once. Mixed precision runs as torch autocast (accelerate's AMP, or inside the DeepSpeed engine),
which keeps bf16 copies of what the matmuls save.

Not counted: the CUDA context and the caching allocator's reserve and fragmentation (plan 1-2 GiB per GPU on
top), NCCL buffers, and evaluation (which runs without gradients and holds less than training).

`Launch(device="cpu")` picks the kernels of a CPU run (dropout masks in the activation dtype rather than
bytes, math attention when attention dropout is on, the single-tensor AdamW), so the estimate can be checked
against measured CPU runs; the default, "cuda", is what it is for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

GiB = float(2**30)

#: the dtype the published checkpoints are stored in (their config.json `torch_dtype`): what `from_pretrained`
#: loads when no dtype is asked for
CHECKPOINT_DTYPE_BYTES = {
    "openai/whisper-large-v3": 2,
    "Qwen/Qwen2.5-7B-Instruct": 2,
    "facebook/wav2vec2-large-960h-lv60-self": 4,
    "google-bert/bert-base-uncased": 4,
}

#: the processor's cap on transcript tokens fed to the EmoQ-Former (also the planning default for the prompt)
MAX_TRANSCRIPT_TOKENS = 128
#: extra answer tokens assumed when the run trains on rationales (`data.rationale: true`)
RATIONALE_TOKENS = 64
#: audio sample rate, and samples per log-mel step of Whisper's feature extractor
SAMPLE_RATE = 16000
MEL_HOP = 160


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class Launch:
    """How the run is launched: processes, DeepSpeed ZeRO stage (None = no DeepSpeed) and its buffers.

    `device`: "cuda" (what the estimate is for) or "cpu" (the kernels of a CPU run, for checks).
    """

    num_processes: int = 1
    zero_stage: int | None = None
    device: str = "cuda"
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000

    @classmethod
    def from_deepspeed_config(cls, ds: dict, num_processes: int, device: str = "cuda") -> Launch:
        """From a DeepSpeed JSON config (its `zero_optimization` section; "auto" values keep DeepSpeed's defaults)."""
        zero = ds.get("zero_optimization") or {}

        def num(key: str, default: int) -> int:
            value = zero.get(key, default)
            return int(value) if isinstance(value, int | float) else default

        stage = zero.get("stage", 0)
        return cls(
            num_processes=num_processes, zero_stage=int(stage) if isinstance(stage, int) else 0, device=device,
            reduce_bucket_size=num("reduce_bucket_size", 500_000_000),
            overlap_comm=bool(zero.get("overlap_comm", False)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            prefetch_bucket_size=num("stage3_prefetch_bucket_size", 50_000_000),
            param_persistence_threshold=num("stage3_param_persistence_threshold", 100_000),
        )

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    def describe(self) -> str:
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        return "DDP" if self.num_processes > 1 else "single process"


@dataclass(frozen=True)
class Workload:
    """What one micro-batch holds. None = from the config: `trainer.batch_size`, clips of `data.max_seconds`
    (30 s without it), transcripts of `MAX_TRANSCRIPT_TOKENS` tokens, the prompt rendered by the chat template."""

    batch_size: int | None = None
    audio_seconds: float | None = None
    transcript_tokens: int | None = None
    prompt_tokens: int | None = None


@dataclass
class Estimate:
    """Bytes per process for one stage. `total` is the peak of a training step: the weights, the optimizer's
    persistent states and buffers, plus the largest of (activations + the gradients already produced) over the
    forward and backward passes and (all gradients + the step's temporaries) at the optimizer step; it is at
    most the sum of the columns. `inputs` lists what the estimate assumed."""

    stage: str
    frozen_weights: float
    trainable_weights: float
    gradients: float
    optimizer_states: float
    activations: float
    total: float
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    breakdown: dict[str, float] = field(default_factory=dict)

    COLUMNS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations")

    def as_dict(self) -> dict:
        out = {"stage": self.stage, **{f"{c}_gib": getattr(self, c) / GiB for c in self.COLUMNS},
               "total_gib": self.total / GiB, "inputs": self.inputs, "params": self.params,
               "activation_breakdown_gib": {k: v / GiB for k, v in self.breakdown.items()}}
        return out


def stages_of(cfg) -> tuple[str, ...]:
    """The training stages a run config has: EmoQ's two, or a baseline's one."""
    return ("stage1", "stage2") if cfg.model.system == "emoq" else ("baseline",)


def estimate_run(cfg, stages: tuple[str, ...] | None = None, launch: Launch = Launch(),
                 workload: Workload = Workload()) -> list[Estimate]:
    """Estimates for `stages` (default: every stage of the config), building the meta model once."""
    stages = stages or stages_of(cfg)
    built = _MetaBuild(cfg)
    return [_estimate(built, stage, launch, workload) for stage in stages]


def estimate(cfg, stage: str, launch: Launch = Launch(), workload: Workload = Workload()) -> Estimate:
    """The estimate for one stage ("stage1", "stage2" or "baseline")."""
    return estimate_run(cfg, (stage,), launch, workload)[0]


# --------------------------------------------------------------------------- the meta model


def _published_or_config(ref: str):
    """(transformers config, checkpoint dtype bytes or None) of a model reference, without reading weights."""
    from ..models.stand_in import PUBLISHED, stand_in_config

    if ref in PUBLISHED:
        return stand_in_config(ref, "full"), CHECKPOINT_DTYPE_BYTES.get(ref)
    from transformers import AutoConfig

    from ..hub import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(ref))
    return config, _dtype_bytes(getattr(config, "dtype", None))


def _dtype_bytes(dtype) -> int | None:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    return {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}.get(name)


def _tokenizer(ref: str):
    """The LLM's tokenizer when it is on this machine (folder, built-in, or the Hugging Face cache), else None."""
    from transformers import AutoTokenizer

    from ..hub import resolve_model
    from ..models.stand_in import PUBLISHED

    try:
        if ref in PUBLISHED:
            return AutoTokenizer.from_pretrained(ref, local_files_only=True)
        return AutoTokenizer.from_pretrained(resolve_model(ref))
    except Exception:  # noqa: BLE001 - any failure means: count the prompt without it
        return None


class _MetaBuild:
    """The run's model on the meta device, and what the estimate needs to know about how it is built."""

    def __init__(self, cfg):
        import torch

        from ..labels import get_label_set

        self.cfg = cfg
        m = cfg.model
        self.labels = list(get_label_set(cfg.data.label_set).labels)
        self.checkpoint_bytes: dict[str, int | None] = {}
        self.processor = None  # an EmoQProcessor (with the LLM's tokenizer when it is at hand)
        self.prompt_exact = False
        # on the meta device, and without drawing from the caller's random streams (tiny models seed them)
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            if m.system == "emoq":
                self.model = self._emoq()
            else:
                self.model = self._baseline()

    def _emoq(self):
        cfg, m = self.cfg, self.cfg.model
        if m.tiny_random:  # built in code: the recipes' own builder, as a fresh stage-1 model
            from .builders import build_model_and_processor

            model, self.processor = build_model_and_processor(cfg)
            self.prompt_exact = True
            return model
        from ..models import EmoQConfig, EmoQForConditionalGeneration
        from ..models.speech_encoder import frame_spec_of, frames_per_second

        audio_config, self.checkpoint_bytes["encoder"] = _published_or_config(m.encoder)
        text_config, self.checkpoint_bytes["llm"] = _published_or_config(m.llm)
        fps = frames_per_second(frame_spec_of(audio_config))
        config = EmoQConfig(
            audio_config=audio_config, text_config=text_config,
            qformer_config={**dataclasses.asdict(m.qformer), "window_seconds": m.window_seconds,
                            "frames_per_second": fps},
            id2label=dict(enumerate(self.labels)), label2id={v: k for k, v in enumerate(self.labels)},
            audio_token_id=0, lora=m.lora.peft_kwargs(), num_query_tokens=m.num_query_tokens,
            encoder_layers=m.encoder_layers, freeze_encoder=m.freeze_encoder, projector_type=m.projector,
            contrastive_dim=m.contrastive_dim,
        )
        model = EmoQForConditionalGeneration(config)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_transcript = cfg.data.use_transcript and m.use_transcript
        tokenizer = _tokenizer(m.llm)
        self.prompt_exact = tokenizer is not None
        from ..models import EmoQProcessor
        from ..models.tiny import whisper_feature_extractor

        self.processor = EmoQProcessor.for_encoder(
            whisper_feature_extractor(), tokenizer or _plain_chat_tokenizer(), self.labels, audio_config,
            num_query_tokens=m.num_query_tokens, window_seconds=m.window_seconds)
        return model

    def _baseline(self):
        cfg, m = self.cfg, self.cfg.model
        if m.tiny_random:
            from .builders import build_baseline

            return build_baseline(cfg)[0]
        from ..models import PatamiaForEmotionClassification, QieemoForEmotionClassification
        from ..models.baselines.patamia import PatamiaConfig
        from ..models.baselines.qieemo import QieemoConfig

        with_text = cfg.data.use_transcript and m.text_encoder is not None
        audio_config, self.checkpoint_bytes["encoder"] = _published_or_config(m.encoder)
        common = {"id2label": dict(enumerate(self.labels)), "label2id": {v: k for k, v in enumerate(self.labels)},
                  "contrastive_dim": m.contrastive_dim, "freeze_encoder": m.freeze_encoder}
        if m.system == "qieemo":
            return QieemoForEmotionClassification(QieemoConfig(
                audio_config=audio_config, feature_layer=m.encoder_layers[0] if m.encoder_layers else None,
                ppg_dim=m.ppg_dim, hidden_size=m.fusion_hidden_size, num_attention_heads=m.fusion_num_heads, **common))
        text_config = None
        if with_text:
            text_config, self.checkpoint_bytes["text_encoder"] = _published_or_config(m.text_encoder)
        return PatamiaForEmotionClassification(PatamiaConfig(
            audio_config=audio_config, text_config=text_config, audio_layers=m.encoder_layers,
            fusion_hidden_size=m.fusion_hidden_size, **common))


def _plain_chat_tokenizer():
    """Stand-in for an LLM tokenizer that is not on this machine: an empty word-level vocabulary that only
    renders the ChatML template (what Qwen uses), so the prompt text is right; its token count is then
    estimated from the text."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ..models.tiny import CHATML_TEMPLATE

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------- trainable parts and dtypes


def _mark_trainable(model, cfg, stage: str) -> None:
    """What each recipe trains (stage1_qformer / stage2_llm `build`; train_baseline trains the model as built),
    less the parts the configured loss never reaches, which the recipes freeze."""
    if stage != "baseline":
        model.requires_grad_(False)
        for part in (model.qformer, model.classifier, model.contrastive_head):
            part.requires_grad_(True)
        layer_weights = model.speech_encoder.layer_weights
        if stage == "stage2":
            model.projector.requires_grad_(True)
            for p in model.adapter_parameters():
                p.requires_grad_(True)
            if layer_weights is not None:
                layer_weights.requires_grad_(True)
        elif layer_weights is not None and not cfg.stage1.cache_encoder_features:
            layer_weights.requires_grad_(True)
    outside = getattr(model, "modules_outside_loss", None)
    if outside is not None:
        loss = cfg.loss if stage == "stage2" else dataclasses.replace(cfg.loss, lm_weight=0.0)
        for params in outside(loss).values():
            for p in params:
                p.requires_grad_(False)


def _quantization(cfg) -> str:
    """How the LLM is quantized: `model.quantization` for an EmoQ model loaded from a checkpoint (a tiny model
    built in code never is)."""
    m = cfg.model
    return m.quantization if m.system == "emoq" and not m.tiny_random else "none"


def _quantized_linears(model) -> dict[str, Any]:
    """The LLM's linear layers bitsandbytes quantizes (every nn.Linear but the LM head and LoRA's own)."""
    from torch import nn

    lm = model.language_model
    head = lm.get_output_embeddings()
    out = {}
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear) and module is not head and "lora_" not in name:
            out[f"language_model.{name}"] = module
    return out


def _quantized_bytes(module, quantization: str) -> float:
    """Bytes of one quantized weight: nf4 packs two weights a byte, with an 8-bit absmax per block of 64
    (double quantisation: an fp32 absmax per 256 blocks, and the two code tables); LLM.int8 keeps int8
    weights with an fp32 scale per output row."""
    n = module.weight.numel()
    if quantization == "4bit":
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * (256 + 16 + 1)
    return n + 4 * module.out_features


@dataclass
class _Param:
    name: str
    numel: int
    nbytes: float  # as held
    dtype_bytes: int  # per element (quantized: the compute dtype's)
    trainable: bool
    quantized: bool = False


def _params(built: _MetaBuild, stage: str) -> list[_Param]:
    """Every parameter with the bytes the run holds it in (see the module docstring for the rules)."""
    from .builders import frozen_dtype

    cfg, model = built.cfg, built.model
    m = cfg.model
    frozen = frozen_dtype(cfg)
    frozen_bytes = frozen.itemsize if frozen is not None else None
    emoq = m.system == "emoq"
    from_folder = emoq and stage == "stage2" and cfg.stage2.init_from is not None
    quantization = _quantization(cfg)
    quantized = _quantized_linears(model) if quantization != "none" else {}
    quantized_weights = {f"{name}.weight": module for name, module in quantized.items()}

    def held(name: str, p) -> int:
        if m.tiny_random or "lora_" in name:  # built in code by the builders: the meta model has the dtypes
            return p.element_size()
        top = name.split(".")[0]
        if emoq and top == "language_model":
            if quantization != "none":
                return 4  # prepare_model_for_kbit_training: every weight left unquantized in fp32
            return frozen_bytes or built.checkpoint_bytes.get("llm") or 4
        if top == "speech_encoder" and name.startswith("speech_encoder.encoder."):
            if frozen_bytes:
                return frozen_bytes
            return 4 if from_folder else (built.checkpoint_bytes.get("encoder") or 4)
        if top == "text_encoder":
            return built.checkpoint_bytes.get("text_encoder") or 4
        return 4

    out = []
    for name, p in model.named_parameters():
        if name in quantized_weights:
            nbytes = _quantized_bytes(quantized_weights[name], quantization)
            out.append(_Param(name, p.numel(), nbytes, 2, p.requires_grad, True))
        else:
            size = held(name, p)
            out.append(_Param(name, p.numel(), p.numel() * size, size, p.requires_grad))
    return out


# --------------------------------------------------------------------------- shapes


@dataclass
class _Shapes:
    batch: int
    seconds: float
    input_steps: int  # mel steps (Whisper) or samples (waveform encoders)
    frames: int  # encoder frames
    windows: int
    frames_per_window: int  # frames each EmoQ-Former window attends to (padded)
    queries: int  # query states per clip (all windows)
    qformer_text: int  # transcript tokens the EmoQ-Former reads
    text_tokens: int  # transcript tokens of the prompt / the baseline's text encoder
    prompt: int  # LLM tokens per row (prompt + answer)
    prompt_exact: bool


def _is_whisper(audio_config) -> bool:
    return audio_config.model_type == "whisper"


def _shapes(built: _MetaBuild, workload: Workload) -> _Shapes:
    from ..models.speech_encoder import encoder_output_length, frame_spec_of, frames_per_second

    cfg, model = built.cfg, built.model
    m = cfg.model
    audio_config = model.speech_encoder.config
    whisper = _is_whisper(audio_config)
    seconds = workload.audio_seconds or cfg.data.max_seconds or 30.0
    spec = frame_spec_of(audio_config)
    if whisper:
        steps = min(int(round(seconds * SAMPLE_RATE)) // MEL_HOP, 2 * audio_config.max_source_positions)
        frames = encoder_output_length(spec, steps)
    else:
        steps = int(round(seconds * SAMPLE_RATE))
        frames = encoder_output_length(spec, steps)
    windows, per_window = 1, frames
    if m.system == "emoq" and m.window_seconds is not None:
        per_window = max(1, round(m.window_seconds * frames_per_second(spec)))
        windows = max(1, math.ceil(frames / per_window))
    transcript = cfg.data.use_transcript
    text = (workload.transcript_tokens if workload.transcript_tokens is not None else MAX_TRANSCRIPT_TOKENS) \
        if transcript else 0
    qformer_text = min(text, MAX_TRANSCRIPT_TOKENS) if (m.system == "emoq" and m.use_transcript) else 0
    queries = m.num_query_tokens * windows
    prompt, exact = 0, True
    if m.system == "emoq":
        if workload.prompt_tokens is not None:
            prompt = workload.prompt_tokens
        else:
            prompt, exact = _prompt_tokens(built, queries, text)
    return _Shapes(batch=workload.batch_size or cfg.trainer.batch_size, seconds=seconds, input_steps=steps,
                   frames=frames, windows=windows, frames_per_window=per_window, queries=queries,
                   qformer_text=qformer_text, text_tokens=text, prompt=prompt, prompt_exact=exact)


def _prompt_tokens(built: _MetaBuild, queries: int, transcript_tokens: int) -> tuple[int, bool]:
    """LLM tokens of the longest training row: chat template with the soft-prompt placeholders, the transcript
    line, the question, and the longest answer. Exact with the LLM's tokenizer; otherwise the rendered text's
    words, punctuation and special tokens are counted (about one token each for English BPE vocabularies)."""
    proc = built.processor
    if built.prompt_exact:
        def count(text: str) -> int:
            return len(proc._ids(text))
    else:
        def count(text: str) -> int:
            return len(re.findall(r"<\|[^|]+\|>|\w+|[^\w\s]", text))

    def prompt(transcript: str | None) -> int:
        text = proc.tokenizer.apply_chat_template(proc.messages(None, transcript), tokenize=False,
                                                  add_generation_prompt=True)
        from ..models.emoq.configuration_emoq import PLACEHOLDER_TOKEN

        return count(text.replace(PLACEHOLDER_TOKEN, "")) + queries

    tokens = prompt(None)
    if transcript_tokens and proc.transcript_in_prompt:
        tokens = prompt("x") - 1 + transcript_tokens  # the "Transcript: ..." line, with the transcript's own tokens
    msgs = proc.messages()
    answer = max(count(proc.answer_suffix(msgs, label)) for label in built.labels)
    if built.cfg.data.rationale:
        answer += RATIONALE_TOKENS
    return tokens + answer, built.prompt_exact


# --------------------------------------------------------------------------- activations


@dataclass
class _Part:
    """One piece of the forward pass, in order: what autograd keeps from it until its backward (`saved`), what
    stays referenced until the next step (`kept`: the output's logits), the temporaries at its own forward and
    backward peaks, and (`owns`, a regex over parameter names) whose gradients its backward produces."""

    name: str
    saved: float = 0.0
    kept: float = 0.0
    forward_peak: float = 0.0
    backward_peak: float = 0.0
    owns: str | None = None
    grads: float = 0.0


@dataclass
class _Precision:
    autocast: bool  # bf16/fp16 mixed precision: torch autocast (accelerate's AMP, or inside the DeepSpeed engine)
    fp32_outputs: bool  # accelerate's AMP returns the model's outputs (the logits) in fp32
    mask_bytes_per_elem: float | None  # dropout mask bytes per element: 1 (CUDA bool mask) or None = the input's
    fused_attention_with_dropout: bool  # CUDA: memory-efficient SDPA supports dropout; CPU: math attention


def _bytes_of(params: list[_Param], prefix: str) -> int:
    """Element size the parameters under `prefix` are held in (4 when none)."""
    for p in params:
        if p.name.startswith(prefix) and not p.quantized:
            return p.dtype_bytes
    return 4


def _dropout_mask(prec: _Precision, elems: float, elem_bytes: float) -> float:
    return elems * (prec.mask_bytes_per_elem if prec.mask_bytes_per_elem is not None else elem_bytes)


def _width(audio_config) -> int:
    return getattr(audio_config, "d_model", None) or audio_config.hidden_size


def _encoder_part(built, params, s: _Shapes, layer_mix_trains: bool) -> _Part:
    """A frozen speech encoder runs without autograd: its peak is the list of every layer's hidden states it
    returns (layer selection reads them) plus one layer's temporaries; only the learned layer mix, when it
    trains, keeps the stacked layers it weighs."""
    enc = built.model.speech_encoder
    cfg = enc.config
    p = _bytes_of(params, "speech_encoder.encoder.")
    b, t, d = s.batch, s.frames, _width(cfg)
    depth = getattr(cfg, "encoder_layers", None) or cfg.num_hidden_layers
    ffn = getattr(cfg, "encoder_ffn_dim", None) or cfg.intermediate_size
    x = b * t * d * p
    layer_tmp = max(5.0, 1.0 + 2.0 * ffn / d) * x
    selected = len(enc.layers) if enc.layer_weights is not None else 0
    if _is_whisper(cfg):  # log-mel cast, two convolutions at the mel rate
        early = 4 * x + b * cfg.num_mel_bins * s.input_steps * p
    else:  # waveform cast; the first feature convolution's output, its transposed copy and its normalisation
        first = (s.input_steps - cfg.conv_kernel[0]) // cfg.conv_stride[0] + 1
        early = (b * s.input_steps * p if p != 4 else 0) + 3 * b * cfg.conv_dim[0] * first * p
    peak = max(early, (depth + 1) * x + layer_tmp, (depth + 2) * x + 2 * selected * x)
    if built.cfg.model.system == "qieemo":
        peak = max(peak, (depth + 1) * x + 2 * x)  # [feature layer ; final layer]
    saved = selected * x if (selected and layer_mix_trains) else 0.0
    return _Part("speech encoder", saved=saved, forward_peak=peak, owns=r"^speech_encoder\.")


def _qformer_parts(built, params, s: _Shapes, prec: _Precision, stage2: bool) -> list[_Part]:
    """The EmoQ-Former (fp32, trains), layer by layer: the inputs its linear layers keep, the attention's saved
    tensors, dropout masks and LayerNorm inputs; windows multiply the rows (each window has its own queries
    and the clip's transcript). Then the heads and the projector."""
    model = built.model
    qc = model.qformer.config
    h, f, heads = qc.hidden_size, qc.intermediate_size, qc.num_attention_heads
    ha = _width(model.speech_encoder.config)
    rows = s.batch * s.windows
    nq, lt = model.config.num_query_tokens, s.qformer_text
    k, tw = nq + lt, s.frames_per_window
    drop = qc.hidden_dropout_prob > 0
    math_attention = not prec.fused_attention_with_dropout and qc.attention_probs_dropout_prob > 0
    checkpointed = bool(getattr(model.qformer, "gradient_checkpointing", False))

    def mask(elems: float) -> float:
        return _dropout_mask(prec, elems, 4) if drop else 0.0

    def attention(q_len: int, kv_len: int) -> float:
        if not math_attention:  # q, k, v, output, log-sum-exp
            return rows * (2 * q_len * h + 2 * kv_len * h) * 4 + rows * heads * q_len * 4
        # math attention: scaled q, scaled k^T, v (contiguous copy), softmax output, dropout mask and output
        return rows * (q_len * h + 2 * kv_len * h) * 4 + 3 * rows * heads * q_len * kv_len * 4

    llm_width = model.config.text_config.hidden_size
    pre = s.batch * s.frames * ha * 4 + rows * tw * ha * 4  # frame LayerNorm input; normalised, padded frames
    if lt:
        pre += rows * lt * llm_width * 4 + rows * lt * h * 4  # text_proj input, text LayerNorm input
    parts = [_Part("EmoQ-Former inputs", saved=pre, backward_peak=rows * tw * ha * 4,
                   owns=r"^qformer\.(?!layers\.)")]
    for i in range(qc.num_hidden_layers):
        saved = rows * k * h * 4  # layer input: the q/k/v linears' input
        saved += attention(k, k) + rows * k * h * 4 + mask(rows * k * h) + rows * k * h * 4  # out-proj in, LN in
        saved += rows * k * h * 4  # LayerNorm output: the cross-attention's queries, the FFNs' inputs
        # backward transients: the gradients of an attention's k and v (or, math attention, of its weights)
        biggest = max(2 * rows * k * h * 4, rows * heads * k * k * 4 if math_attention else 0)
        if i % qc.cross_attention_frequency == 0:
            saved += attention(nq, tw) + rows * nq * h * 4 + mask(rows * nq * h) + 2 * rows * nq * h * 4
            biggest = max(biggest, 2 * rows * tw * h * 4, rows * heads * nq * tw * 4 if math_attention else 0)
        for length in (nq, lt) if lt else (nq,):
            saved += 2 * rows * length * f * 4 + mask(rows * length * h) + rows * length * h * 4  # FFN
        owns = rf"^qformer\.layers\.{i}\."
        if checkpointed:  # the block's input is kept; its activations come back in backward
            parts.append(_Part(f"EmoQ-Former layer {i} (checkpointed)", saved=rows * k * h * 4,
                               backward_peak=saved + biggest, owns=owns))
        else:
            parts.append(_Part(f"EmoQ-Former layer {i}", saved=saved, backward_peak=biggest, owns=owns))
    heads_saved = 0.0
    if stage2:
        proj_in = 2 if prec.autocast else _bytes_of(params, "projector.")
        heads_saved += s.batch * s.queries * h * proj_in
        if built.cfg.model.projector == "mlp":
            heads_saved += 2 * s.batch * s.queries * llm_width * proj_in
    parts.append(_Part("heads and projector", saved=heads_saved, owns=r"^(classifier|contrastive_head|projector)\."))
    return parts


@dataclass
class _LLMDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _llm_dims(text_config) -> _LLMDims:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return _LLMDims(layers=text_config.num_hidden_layers, hidden=text_config.hidden_size,
                    intermediate=text_config.intermediate_size, heads=heads,
                    kv_heads=getattr(text_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                    vocab=text_config.vocab_size)


#: which input each LoRA target of a Llama-style decoder layer reads
_LORA_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


def _lora_layers(model) -> list[tuple[str, int, int, float]]:
    """(name, in_features, r, dropout p) of each LoRA layer in the LLM's first decoder layer."""
    from peft.tuners.lora import LoraLayer
    from torch import nn

    out = []
    for name, module in model.language_model.named_modules():
        if isinstance(module, LoraLayer) and re.search(r"\.layers\.0\.", f".{name}."):
            adapter = next(iter(module.lora_A))
            dropout = module.lora_dropout[adapter]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            out.append((name.rsplit(".", 1)[-1], module.in_features, module.r[adapter], p))
    return out


def _llm_parts(built, params, s: _Shapes, prec: _Precision, launch: Launch) -> list[_Part]:
    """The LLM under LoRA: per decoder layer what autograd keeps (the RMSNorms' fp32 inputs, LoRA inputs and
    dropout masks, q/k/v/output of the attention with its float mask, the SwiGLU's three tensors; the frozen
    base linear layers keep nothing of their inputs); with gradient checkpointing only each layer's input, plus
    one recomputed layer in backward. Then the LM head: the logits the output keeps, the log-softmax the loss
    keeps and, at the start of backward, their two gradients."""
    cfg, model = built.cfg, built.model
    d = _llm_dims(model.config.text_config)
    b, n = s.batch, s.batch * s.prompt
    quantization = _quantization(cfg)
    linear = [p for p in params if re.search(r"\.layers\.\d+\..*proj.*weight$", p.name) and "lora_" not in p.name]
    w_llm = next((p.dtype_bytes for p in linear if not p.quantized), 2)
    w_emb = next((p.dtype_bytes for p in params if "embed_tokens" in p.name), 4)
    w_head = next((p.dtype_bytes for p in params if p.name.endswith("lm_head.weight")), w_emb)
    lora_w = next((p.dtype_bytes for p in params if "lora_" in p.name), 4)
    compute = 2 if (prec.autocast or quantization != "none") else w_llm  # linear outputs
    residual = max(w_emb, compute)
    attn = 2 if prec.autocast else max(compute, residual)  # q/k/v as the attention receives them
    norm_out = residual if quantization == "none" else 4  # fp32 RMSNorm weights (k-bit training) promote
    h, i_, hd = d.hidden, d.intermediate, d.heads * d.head_dim
    kv = d.kv_heads * d.head_dim
    input_bytes = {"attn_in": norm_out, "attn_out": attn, "mlp_in": norm_out, "mlp_mid": compute}

    layer = 2 * n * h * 4 + 2 * n * 4  # the two RMSNorms' fp32 inputs (and their rsqrt)
    shared = {"attn_out"}  # lora_A can read the attention's output itself, which the attention already keeps
    lora = _lora_layers(model)
    for name, d_in, r, p in lora:
        group = _LORA_INPUTS.get(name, "attn_in")
        x_bytes = input_bytes[group]
        if p > 0:
            layer += _dropout_mask(prec, n * d_in, lora_w)
        if prec.autocast:
            layer += n * d_in * 2  # the bf16 copy autocast feeds lora_A
        elif p > 0 or x_bytes != lora_w:
            layer += n * d_in * lora_w  # dropout output or dtype cast: a tensor of its own
        elif group not in shared:  # lora_A reads the very input tensor, shared by the group's adapters
            shared.add(group)
            layer += n * d_in * x_bytes
        layer += n * r * (2 if prec.autocast else lora_w)  # lora_A output
    padded = b > 1  # a padded batch makes transformers pass a mask, which also disables SDPA's native GQA
    gqa_native = launch.device == "cuda" and not padded
    k_len = s.prompt if launch.device == "cpu" else math.ceil(s.prompt / 16) * 16
    layer += n * hd * attn * 2 + (2 * n * kv * attn if gqa_native else 2 * n * hd * attn)  # q, out; k, v
    layer += b * d.heads * s.prompt * 4 + (b * s.prompt * k_len * attn if padded else 0)  # lse, float mask
    layer += 3 * n * i_ * compute  # SwiGLU: gate, its activation, up
    frozen_linear = sum(p.numel for p in linear if not p.trainable and not p.quantized and ".layers.0." in p.name)
    if prec.autocast and w_llm == 4:
        layer += frozen_linear * 2  # autocast's bf16 copies of fp32 frozen weights, kept by the matmuls
    # backward through a layer: the incoming gradient of the residual stream and its copy, and the larger of
    # the SwiGLU product's two factor gradients and (at the end of a recomputation) the product with the copy
    # the down projection's LoRA casts it to
    down_cast = lora_w if any(name == "down_proj" for name, *_ in lora) and compute != lora_w else 0
    backward_tmp = n * 2 * h * residual + n * i_ * max(2 * compute, compute + down_cast)
    if quantization != "none":
        backward_tmp += max((p.numel for p in params if p.quantized), default=0) * 2  # a dequantised weight
    parts = []
    for i in range(d.layers):
        owns = rf"^language_model\..*\.layers\.{i}\."
        if cfg.model.gradient_checkpointing:  # each layer's input (and, once, the bool attention mask) is kept
            saved = n * h * residual + (b * s.prompt * s.prompt if padded and i == 0 else 0)
            parts.append(_Part(f"LLM layer {i} (checkpointed)", saved=saved, backward_peak=layer + backward_tmp,
                               owns=owns))
        else:
            parts.append(_Part(f"LLM layer {i}", saved=layer, backward_peak=backward_tmp, owns=owns))
    logits_out = 2 if prec.autocast else w_head
    kept = n * d.vocab * (4 if prec.fp32_outputs else logits_out)
    head_saved = n * h * 4 + n * d.vocab * 4  # final RMSNorm input; log-softmax output
    if prec.autocast and w_head == 4:
        head_saved += d.vocab * h * 2  # bf16 copy of the fp32 LM head weight
    head_forward = n * d.vocab * (logits_out + (4 if logits_out != 4 else 0))  # logits and their fp32 copy
    parts.append(_Part("LM head and loss", saved=head_saved, kept=kept, forward_peak=head_forward,
                       backward_peak=2 * n * d.vocab * 4))
    return parts


def _baseline_parts(built, params, s: _Shapes, prec: _Precision) -> list[_Part]:
    """The baselines' trainable heads over frames (Qieemo: MMF + two cross-modal attentions over every frame)
    or over pooled vectors (Patamia: small; its frozen text encoder only adds forward temporaries)."""
    model, cfg = built.model, built.cfg
    b, t = s.batch, s.frames
    if cfg.model.system == "qieemo":
        c = model.config
        ha = _width(model.speech_encoder.config)
        hh, ppg, heads = c.hidden_size, c.ppg_dim, c.num_attention_heads
        x = b * t
        act = 2 if prec.autocast else 4

        def mask(elems: float) -> float:
            return _dropout_mask(prec, elems, act)

        saved = x * 2 * ha * 4 + x * ppg * 4  # fp32 [feature ; final] frames, the PPG (softmax output)
        saved += x * hh * act * 4 + 2 * x * 2 * hh * act  # a, p, the gate and its complement; the two concats
        biggest = 2 * x * 2 * hh * 4  # backward transients: the gradients of the concatenations
        for _ in range(2):  # the cross-modal attentions: input copies, k/v, q, output (+ its copy)
            saved += x * hh * act * 7
            if not prec.fused_attention_with_dropout:  # math attention: softmax output, dropout mask and output
                saved += 3 * b * heads * t * t * 4
                biggest = max(biggest, b * heads * t * t * 4)
        saved += 2 * (mask(x * hh) + x * hh * act) + mask(x * hh) + x * hh * act  # dropouts, LayerNorm inputs
        return [_Part("Qieemo fusion", saved=saved, backward_peak=biggest, owns=r".")]
    parts = []
    text = model.text_encoder
    if text is not None and s.text_tokens:
        tc = text.config
        p = _bytes_of(params, "text_encoder.")
        parts.append(_Part("text encoder", forward_peak=b * s.text_tokens * (2 * tc.intermediate_size
                                                                             + 4 * tc.hidden_size) * p,
                           owns=r"^text_encoder\."))
    parts.append(_Part("Patamia fusion", owns=r"."))
    return parts


def _inputs_bytes(built, s: _Shapes, stage: str) -> float:
    """The micro-batch on the device: features or waveforms (fp32), int64 masks, token ids and labels."""
    m = built.cfg.model
    b = s.batch
    audio = built.model.speech_encoder.config
    if stage == "stage1" and built.cfg.stage1.cache_encoder_features:
        total = b * s.frames * _width(audio) * 4 + b * s.frames
    elif _is_whisper(audio):
        total = b * audio.num_mel_bins * s.input_steps * 4 + b * s.input_steps * 8
    else:
        total = b * s.input_steps * (4 + 8)
    total += 2 * b * s.text_tokens * 8
    if m.system == "emoq" and stage == "stage2":
        total += 3 * b * s.prompt * 8
    return total


def _parts(built, params, stage: str, s: _Shapes, launch: Launch) -> list[_Part]:
    cfg = built.cfg
    autocast = cfg.trainer.mixed_precision in ("bf16", "fp16")
    prec = _Precision(autocast=autocast, fp32_outputs=autocast and not launch.deepspeed,
                      mask_bytes_per_elem=1.0 if launch.device == "cuda" else None,
                      fused_attention_with_dropout=launch.device == "cuda")
    parts = [_Part("micro-batch", saved=_inputs_bytes(built, s, stage))]
    if cfg.model.system == "emoq":
        cached = stage == "stage1" and cfg.stage1.cache_encoder_features
        if not cached:
            parts.append(_encoder_part(built, params, s, layer_mix_trains=True))
        parts += _qformer_parts(built, params, s, prec, stage == "stage2")
        if stage == "stage2":
            parts += _llm_parts(built, params, s, prec, launch)
    else:
        parts.append(_encoder_part(built, params, s, layer_mix_trains=True))
        parts += _baseline_parts(built, params, s, prec)
    return parts


@dataclass
class _Peak:
    activations: float  # the activation peak alone (forward or backward)
    step: float  # the dynamic peak: activations + gradients alive + optimizer-step temporaries
    where: str


def _peak(parts: list[_Part], step_temporaries: float) -> _Peak:
    """The step's dynamic peak over three phases: the forward (what earlier parts keep + one part's
    temporaries), the backward (later parts' activations are freed while their gradients appear), the
    optimizer step (every gradient + the step's temporaries, with the micro-batch and the kept logits)."""
    kept = sum(p.kept for p in parts)
    acts, step, where = 0.0, 0.0, ""
    saved = 0.0
    for part in parts:
        here = saved + part.saved + part.forward_peak
        acts = max(acts, here)
        if here > step:
            step, where = here, f"forward: {part.name}"
        saved += part.saved
    grads = 0.0
    for i in range(len(parts) - 1, -1, -1):
        grads += parts[i].grads
        here = saved + kept + parts[i].backward_peak
        acts = max(acts, here)
        if here + grads > step:
            step, where = here + grads, f"backward: {parts[i].name}"
        saved -= parts[i].saved
    at_step = parts[0].saved + kept + grads + step_temporaries
    if at_step > step:
        step, where = at_step, "optimizer step"
    return _Peak(acts, step, where)


# --------------------------------------------------------------------------- weights, gradients, optimizer


def _estimate(built: _MetaBuild, stage: str, launch: Launch, workload: Workload) -> Estimate:
    cfg = built.cfg
    if stage not in stages_of(cfg):
        raise ValueError(f"stage {stage!r} is not a stage of a {cfg.model.system} run (stages: {stages_of(cfg)})")
    _mark_trainable(built.model, cfg, stage)
    params = _params(built, stage)
    s = _shapes(built, workload)
    nproc = max(1, launch.num_processes)
    zero = launch.zero_stage or 0
    trainable = [p for p in params if p.trainable]
    frozen = [p for p in params if not p.trainable]
    t_numel = sum(p.numel for p in trainable)
    t_bytes = sum(p.nbytes for p in trainable)
    f_bytes = sum(p.nbytes for p in frozen)
    if zero >= 3:
        # parameters sharded; small ones persist whole; while a module runs, its gathered weights and the
        # prefetched next ones (about two prefetch buckets, or the largest weight), never more than the model
        def sharded(ps):
            return sum(p.nbytes if p.numel < launch.param_persistence_threshold else p.nbytes / nproc for p in ps)

        largest = max((p.nbytes for p in params), default=0)
        working = min(sum(p.nbytes for p in params), 2 * max(launch.prefetch_bucket_size * 2, largest))
        f_bytes, t_bytes = sharded(frozen) + working, sharded(trainable)
    grad_share = nproc if zero >= 2 else 1  # ZeRO-2/3 keep this process's shard of every gradient
    if launch.deepspeed:
        # the ZeRO optimizer: fp32 master weights + AdamW moments, sharded from stage 1 on; at the step, the fp32
        # gradient shard and AdamW's temporary; ZeRO-2/3 also hold the reduce bucket(s)
        shard = nproc if zero >= 1 else 1
        optimizer, step_tmp = t_numel * (4 + 8) / shard, t_numel * (4 + 4) / shard
        buckets = 0.0
        if zero >= 2 and t_numel and launch.contiguous_gradients:
            width = max(p.dtype_bytes for p in trainable)
            buckets = min(launch.reduce_bucket_size, t_numel) * width * (2 if launch.overlap_comm else 1)
    else:
        optimizer = sum(2 * p.numel * p.dtype_bytes for p in trainable)  # AdamW's moments, in the weights' dtype
        if launch.device == "cuda":  # foreach AdamW: one temporary the size of all trainable weights
            step_tmp = sum(p.numel * p.dtype_bytes for p in trainable)
        else:  # single-tensor AdamW: two temporaries of the largest weight
            step_tmp = 2 * max((p.numel * p.dtype_bytes for p in trainable), default=0)
        buckets = sum(p.numel * p.dtype_bytes for p in trainable) if nproc > 1 else 0.0  # DDP's gradient buckets
    parts = _parts(built, params, stage, s, launch)
    for p in trainable:  # each gradient appears when the part that uses the weight back-propagates
        owner = next((part for part in reversed(parts) if part.owns and re.search(part.owns, p.name)), parts[-1])
        owner.grads += p.numel * p.dtype_bytes / grad_share
    grads = sum(part.grads for part in parts)
    peak = _peak(parts, step_tmp)
    total = f_bytes + t_bytes + optimizer + buckets + peak.step
    m = cfg.model
    lora = m.lora.peft_kwargs() if m.system == "emoq" else None
    inputs = {
        "processes": nproc, "launch": launch.describe(), "zero_stage": launch.zero_stage,
        "mixed_precision": cfg.trainer.mixed_precision, "quantization": m.quantization if m.system == "emoq" else "none",
        "lora_r": lora["r"] if (lora and stage == "stage2") else None,
        "gradient_checkpointing": m.gradient_checkpointing, "batch_size": s.batch, "audio_seconds": s.seconds,
        "encoder_frames": s.frames, "windows": s.windows, "query_states": s.queries,
        "transcript_tokens": s.text_tokens,
        "sequence_length": s.prompt if (m.system == "emoq" and stage == "stage2") else None,
        "sequence_length_exact": s.prompt_exact, "device": launch.device, "peak_during": peak.where,
    }
    by_module: dict[str, list[int]] = {}
    for p in params:
        row = by_module.setdefault(p.name.split(".")[0], [0, 0])
        row[0] += p.numel
        row[1] += p.numel if p.trainable else 0
    params_info = {"total": sum(p.numel for p in params), "trainable": t_numel,
                   "by_module": {k: {"total": v[0], "trainable": v[1]} for k, v in by_module.items()}}
    breakdown: dict[str, float] = {}
    for part in parts:
        key = re.sub(r" \d+( \(checkpointed\))?$", "s", part.name)
        breakdown[key] = breakdown.get(key, 0.0) + part.saved + part.kept
    return Estimate(stage=stage, frozen_weights=f_bytes, trainable_weights=t_bytes, gradients=grads + buckets,
                    optimizer_states=optimizer + step_tmp, activations=peak.activations, total=total,
                    inputs=inputs, params=params_info, breakdown=breakdown)


# --------------------------------------------------------------------------- output


def format_bytes(nbytes: float) -> str:
    """`18.97 GiB`, or `17.04 MiB` below half a GiB."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 2 else f"{nbytes / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def print_estimates(estimates: list[Estimate], heading: str, console=None) -> None:
    """One table: a column per stage, the memory rows, then what each estimate assumed."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    large = max(e.total for e in estimates) >= GiB / 2
    unit, scale = ("GiB", GiB) if large else ("MiB", 2.0**20)
    where = "process" if estimates[0].inputs.get("device") == "cpu" else "GPU"
    table = Table(title=f"{heading}: memory per {where} ({unit})")
    table.add_column("")
    for e in estimates:
        table.add_column(e.stage, justify="right")
    labels = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights",
              "gradients": "gradients", "optimizer_states": "optimizer states", "activations": "activations"}
    for col, label in labels.items():
        table.add_row(label, *(f"{getattr(e, col) / scale:.2f}" for e in estimates))
    table.add_row(f"[bold]total per {where}[/bold]", *(f"[bold]{e.total / scale:.2f}[/bold]" for e in estimates),
                  end_section=True)
    table.add_row("parameters (trainable)", *(f"{_count(e.params['total'])} ({_count(e.params['trainable'])})"
                                              for e in estimates))
    rows = [("processes", lambda i: f"{i['processes']} ({i['launch']})"),
            ("precision", lambda i: i["mixed_precision"] + (f", {i['quantization']}" if i["quantization"] != "none"
                                                              else "")),
            ("LoRA r", lambda i: "-" if i["lora_r"] is None else str(i["lora_r"])),
            ("gradient checkpointing", lambda i: "yes" if i["gradient_checkpointing"] else "no"),
            ("micro-batch", lambda i: str(i["batch_size"])),
            ("audio (s) / frames", lambda i: f"{i['audio_seconds']:g} / {i['encoder_frames']}"),
            ("query states / transcript tokens", lambda i: f"{i['query_states']} / {i['transcript_tokens']}"),
            ("LLM sequence length", lambda i: "-" if i["sequence_length"] is None else
             f"{i['sequence_length']}{'' if i['sequence_length_exact'] else ' (approx.)'}")]
    for label, fmt in rows:
        table.add_row(label, *(fmt(e.inputs) for e in estimates))
    console.print(table)
