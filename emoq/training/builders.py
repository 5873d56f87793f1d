"""What the recipes build from a config: the model and its processor, the data loaders, the optimiser."""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch.utils.data import DataLoader

from ..config import RunConfig, StageConfig
from ..data.collate import EmoQCollator, ScanResult, UtteranceDataset, scan_utterances
from ..data.splits import read_split
from ..labels import get_label_set
from .runtime import seed_worker

log = logging.getLogger("emoq.training")


# ------------------------------------------------------------------ model


def frozen_dtype(cfg: RunConfig) -> torch.dtype | None:
    """The dtype of the frozen pretrained parts (speech encoder, LLM): bf16 under bf16 mixed precision, on
    every device — so a CPU run in bf16 holds the same dtypes as the GPU run it stands in for — else as
    saved. Whatever trains (EmoQ-Former, heads, projector, LoRA) stays fp32."""
    return torch.bfloat16 if cfg.trainer.mixed_precision == "bf16" else None


def build_model_and_processor(cfg: RunConfig, init_from: str | None = None):
    """Stage 1: a fresh model around pretrained (or tiny random) parts. Stage 2: the stage-1 folder."""
    from ..models import EmoQProcessor

    labels = list(get_label_set(cfg.data.label_set).labels)
    m = cfg.model
    if m.system != "emoq":
        raise ValueError(f"model.system={m.system!r}: this config is for a baseline; train it with "
                         "`emoq run train_baseline` (stage1_qformer / stage2_llm build EmoQ)")
    if init_from:
        model = _stage1_model(cfg, init_from)
        processor = EmoQProcessor.from_pretrained(init_from)
        if list(model.config.id2label.values()) != labels:
            raise ValueError(
                f"{init_from}: trained with labels {list(model.config.id2label.values())}, "
                f"but data.label_set={cfg.data.label_set} has {labels}"
            )
    elif m.tiny_random:
        from ..models.tiny import build_tiny

        model, processor = build_tiny(
            labels, num_query_tokens=m.num_query_tokens, window_seconds=m.window_seconds,
            lora=cfg.model.lora.peft_kwargs(), encoder_layers=m.encoder_layers, seed=cfg.seed,
            qformer=dataclasses.asdict(m.qformer), contrastive_dim=m.contrastive_dim, projector_type=m.projector,
        )
    else:
        model, processor = _from_pretrained_parts(cfg, labels)
    cast_frozen_parts(model, frozen_dtype(cfg))
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_transcript = cfg.data.use_transcript and m.use_transcript
    processor.rationale_separator = "\n" if cfg.data.rationale else None  # saved with the processor
    model.loss_config = cfg.loss
    return model, processor


def cast_frozen_parts(model, dtype: torch.dtype | None) -> None:
    """The frozen speech encoder and base LLM in `dtype` (a quantized LLM keeps its own); LoRA weights stay
    fp32, as peft adds them to a bf16 LLM, so optimiser updates are never rounded to bf16."""
    if dtype is None:
        return
    model.speech_encoder.encoder.to(dtype)
    if not getattr(model.language_model.config, "quantization_config", None):
        model.language_model.to(dtype)
        for p in model.adapter_parameters():
            p.data = p.data.float()


def build_baseline(cfg: RunConfig):
    """(Qieemo | Patamia model, BaselineProcessor) for `model.system`, trained with the same MAL weights."""
    labels = list(get_label_set(cfg.data.label_set).labels)
    m = cfg.model
    with_text = cfg.data.use_transcript and m.text_encoder is not None
    if m.system not in ("qieemo", "patamia"):
        raise ValueError(f"model.system={m.system!r} is not a baseline (qieemo | patamia); EmoQ trains with "
                         "recipes stage1_qformer and stage2_llm")
    if m.tiny_random:
        from ..models.tiny import build_tiny_baseline

        model, processor = build_tiny_baseline(m.system, labels, seed=cfg.seed, with_text=with_text)
    else:
        model, processor = _baseline_from_pretrained_parts(cfg, labels, with_text)
    model.loss_config = cfg.loss
    return model, processor


def _baseline_from_pretrained_parts(cfg: RunConfig, labels: list[str], with_text: bool):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

    from ..hub import resolve_model
    from ..models import BaselineProcessor, PatamiaForEmotionClassification, QieemoForEmotionClassification

    m = cfg.model
    encoder = resolve_model(m.encoder)
    audio_config, fe = AutoConfig.from_pretrained(encoder), AutoFeatureExtractor.from_pretrained(encoder)
    common = {"id2label": dict(enumerate(labels)), "contrastive_dim": m.contrastive_dim,
              "freeze_encoder": m.freeze_encoder, "dtype": frozen_dtype(cfg) if m.freeze_encoder else None}
    if m.system == "qieemo":
        model = QieemoForEmotionClassification.from_components(
            encoder, feature_layer=m.encoder_layers[0] if m.encoder_layers else None, ppg_dim=m.ppg_dim,
            hidden_size=m.fusion_hidden_size, num_attention_heads=m.fusion_num_heads, **common,
        )
        return model, BaselineProcessor.for_encoder(fe, labels, audio_config)
    text = resolve_model(m.text_encoder) if with_text else None
    model = PatamiaForEmotionClassification.from_components(
        encoder, text, audio_layers=m.encoder_layers, fusion_hidden_size=m.fusion_hidden_size, **common,
    )
    tokenizer = AutoTokenizer.from_pretrained(text) if text else None
    return model, BaselineProcessor.for_encoder(fe, labels, audio_config, tokenizer=tokenizer)


def _stage1_model(cfg: RunConfig, init_from: str):
    """The stage-1 model as stage 2 starts from it. As saved, when the config asks for the same LLM setup
    stage 1 used; otherwise (QLoRA: `model.quantization`, or another `model.lora`) the stage-1 speech side
    around the LLM reloaded from `model.llm` (`EmoQForConditionalGeneration.from_stage1`)."""
    from ..models import EmoQConfig, EmoQForConditionalGeneration

    m, lora = cfg.model, cfg.model.lora.peft_kwargs()
    saved = EmoQConfig.from_pretrained(init_from)
    refuse_changed_architecture(cfg, saved, init_from)
    saved_quantized = bool(getattr(saved.text_config, "quantization_config", None))
    if m.quantization == "none" and not saved_quantized and saved.lora == lora:
        return EmoQForConditionalGeneration.from_pretrained(init_from, dtype=frozen_dtype(cfg))
    if m.tiny_random:
        raise ValueError("model.tiny_random: stage 2 cannot change model.quantization or model.lora from what "
                         "stage 1 saved (there is no model.llm to reload the LLM from)")
    from ..hub import resolve_model

    return EmoQForConditionalGeneration.from_stage1(init_from, resolve_model(m.llm), lora=lora,
                                                    quantization=m.quantization, dtype=frozen_dtype(cfg))


#: what shapes the stage-1 model: run-config key -> (its value in a run config, its value in a saved EmoQConfig)
_STAGE1_ARCHITECTURE = {
    **{f"model.qformer.{name}": (lambda m, name=name: getattr(m.qformer, name),
                                 lambda c, name=name: getattr(c.qformer_config, name))
       for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "cross_attention_frequency", "hidden_dropout_prob")},
    "model.num_query_tokens": (lambda m: m.num_query_tokens, lambda c: c.num_query_tokens),
    "model.window_seconds": (lambda m: m.window_seconds, lambda c: c.qformer_config.window_seconds),
    "model.encoder_layers": (lambda m: list(m.encoder_layers), lambda c: list(c.encoder_layers)),
    "model.projector": (lambda m: m.projector, lambda c: c.projector_type),
    "model.contrastive_dim": (lambda m: m.contrastive_dim, lambda c: c.contrastive_dim),
}


def refuse_changed_architecture(cfg: RunConfig, saved, init_from: str) -> None:
    """Stage 2 continues the stage-1 model, so a config that asks for another EmoQ-Former shape than stage 1
    trained is an error, not a silent reload of the saved shape (nor a fresh, untrained one)."""
    changed = [f"{key} is {wanted(cfg.model)!r} here but stage 1 trained {trained(saved)!r}"
               for key, (wanted, trained) in _STAGE1_ARCHITECTURE.items() if wanted(cfg.model) != trained(saved)]
    if changed:
        raise ValueError(f"{init_from}: the config changes the stage-1 model: {'; '.join(changed)}. Stage 2 "
                         "continues stage 1: set these back, or rerun stage 1 with them")


def _from_pretrained_parts(cfg: RunConfig, labels: list[str]):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

    from ..hub import resolve_model
    from ..models import EmoQForConditionalGeneration, EmoQProcessor

    m = cfg.model
    encoder, llm = resolve_model(m.encoder), resolve_model(m.llm)
    audio_config = AutoConfig.from_pretrained(encoder)
    processor = EmoQProcessor.for_encoder(
        AutoFeatureExtractor.from_pretrained(encoder), AutoTokenizer.from_pretrained(llm), labels, audio_config,
        num_query_tokens=m.num_query_tokens, window_seconds=m.window_seconds,
    )
    model = EmoQForConditionalGeneration.from_components(
        encoder, llm,
        id2label=dict(enumerate(labels)),
        audio_token_id=processor.audio_token_id,
        qformer={**dataclasses.asdict(m.qformer), "window_seconds": m.window_seconds,
                 "frames_per_second": processor.frames_per_second},
        lora=cfg.model.lora.peft_kwargs(),
        quantization=m.quantization,
        dtype=frozen_dtype(cfg),
        num_query_tokens=m.num_query_tokens,
        encoder_layers=m.encoder_layers,
        freeze_encoder=m.freeze_encoder,
        projector_type=m.projector,
        contrastive_dim=m.contrastive_dim,
    )
    # checkpoints then hold what trains and name the frozen LLM, instead of a copy of its weights
    model.config.base_llm = m.llm
    model.config.base_llm_revision = getattr(model.language_model.config, "_commit_hash", None)
    return model, processor


def trainable_parameter_table(model) -> list[tuple[str, int, int]]:
    """(module, trainable, total) per top-level module, printed at the start of every stage."""
    rows = []
    for name, module in model.named_children():
        params = list(module.parameters())
        if not params:
            continue
        rows.append((name, sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)))
    return rows


def print_parameter_table(model) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="parameters")
    for col in ("module", "trainable", "total"):
        table.add_column(col, justify="right" if col != "module" else "left")
    rows = trainable_parameter_table(model)
    for name, trainable, total in rows:
        table.add_row(name, f"{trainable:,}", f"{total:,}")
    table.add_row("all", f"{sum(r[1] for r in rows):,}", f"{sum(r[2] for r in rows):,}")
    Console().print(table)


# ------------------------------------------------------------------ data


def load_split(cfg: RunConfig, split: str):
    """Utterances of one split ('train', 'dev', 'test') of the configured corpus."""
    d = cfg.data
    if d.dataset in ("meld", "iemocap") and not d.root:
        raise ValueError(f"data.root is required for dataset={d.dataset} (the corpus folder)")
    manifest = {"train": d.train_manifest, "dev": d.eval_manifest, "test": d.test_manifest}[split]
    if d.dataset == "manifest" and not manifest:
        raise ValueError(f"data.{ {'dev': 'eval'}.get(split, split)}_manifest is required for dataset=manifest")
    if d.dataset == "hf":
        return read_split("hf", getattr(d.splits, split), label_set=d.label_set, hf=hf_source(cfg))
    return read_split(d.dataset, split, root=d.root, manifest=manifest, label_set=d.label_set, fold=d.fold,
                      dev_fraction=d.dev_fraction)


def hf_source(cfg: RunConfig) -> dict:
    """Where a `datasets` corpus is and how its columns and labels read (data.dataset: hf)."""
    d = cfg.data
    return {"path": d.path, "name": d.name, "revision": d.revision, "columns": d.columns, "label_map": d.label_map}


def scanned_split(cfg: RunConfig, split: str, accelerator=None) -> ScanResult:
    """Load + validate a split; report every unusable row (never dropped silently)."""
    scan = scan_utterances(load_split(cfg, split), cfg.data.max_seconds)
    if scan.errors and (accelerator is None or accelerator.is_main_process):
        log.warning("%s: %d of %d rows cannot be used:", split, len(scan.errors), len(scan.errors) + len(scan.ok))
        for key, msg in scan.errors[:20]:
            log.warning("  %s: %s", key, msg)
    if not scan.ok:
        raise ValueError(f"split '{split}' has no usable rows ({len(scan.errors)} errors)")
    return scan


def train_loader(cfg: RunConfig, scan: ScanResult, processor, label2id, prompt: bool, frame_cache=None):
    """Training batches; `prompt`: with the LLM chat prompt and the answer as LM labels (stage 2), else audio
    (+ transcript) only (stage 1, the baselines)."""
    from ..data.sampling import ClassBalancedSampler, LengthGroupedBatchSampler

    dataset = UtteranceDataset(scan.ok, label2id, cfg.data.max_seconds, cfg.data.use_transcript, frame_cache)
    collate = EmoQCollator(processor, with_prompt=prompt, with_answers=prompt)
    # a dedicated generator: creating a loader iterator then draws from it, not from the global RNG that
    # dropout uses, so a resumed run (iterator created mid-epoch) stays on the uninterrupted run's RNG path
    common = dict(collate_fn=collate, num_workers=cfg.data.num_workers, worker_init_fn=seed_worker,
                  generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.data.class_balanced:
        sampler = ClassBalancedSampler([u.label for u in scan.ok], seed=cfg.seed)
        return DataLoader(dataset, batch_size=cfg.trainer.batch_size, sampler=sampler, drop_last=True, **common), sampler
    sampler = LengthGroupedBatchSampler(scan.durations, cfg.trainer.batch_size, shuffle=True, seed=cfg.seed,
                                        group_by_length=cfg.data.group_by_length)
    return DataLoader(dataset, batch_sampler=sampler, **common), sampler


def stream_loader(cfg: RunConfig, processor, label2id, prompt: bool, accelerator):
    """Training batches from a streamed `datasets` split (data.streaming), this rank's part of it; returns the
    loader and the stream (its position goes into checkpoints)."""
    from ..data.streaming import StreamingUtterances

    d = cfg.data
    stream = StreamingUtterances(
        d.path, d.splits.train, name=d.name, revision=d.revision, columns=d.columns, label_set=d.label_set,
        label_map=d.label_map, label2id=label2id, batch_size=cfg.trainer.batch_size, buffer_size=d.stream_buffer,
        seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
        max_seconds=d.max_seconds, use_transcript=d.use_transcript)
    collate = EmoQCollator(processor, with_prompt=prompt, with_answers=prompt)
    # its own generator: creating the loader's iterator must not draw from the RNG dropout uses (see train_loader)
    return DataLoader(stream, batch_size=cfg.trainer.batch_size, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.seed)), stream


def eval_loader(cfg: RunConfig, scan: ScanResult, processor, label2id, prompt: bool):
    dataset = UtteranceDataset(scan.ok, label2id, cfg.data.max_seconds, cfg.data.use_transcript)
    collate = EmoQCollator(processor, with_prompt=prompt)
    return DataLoader(dataset, batch_size=cfg.trainer.eval_batch_size, shuffle=False, collate_fn=collate)


# ------------------------------------------------------------------ optimiser


def build_optimizer(model, stage: StageConfig, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW with one learning rate per module group (EmoQ-Former side vs LoRA), warmup + cosine.

    Weight decay applies to weight matrices only: biases, norm weights, embedding tables, the learned query
    tokens and the layer-mix logits are left undecayed (decaying them pulls LayerNorm gains and the queries
    towards zero, which is not regularisation but damage)."""
    from transformers import get_cosine_schedule_with_warmup

    adapters = {id(p) for p in getattr(model, "adapter_parameters", list)()}
    lrs = {part: stage.learning_rate if lr is None else lr  # 0 freezes a group; only None means "unset"
           for part, lr in (("lora", stage.lr_lora), ("qformer", stage.lr_qformer))}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = "lora" if id(p) in adapters else "qformer"
            groups.setdefault((part, decays(model, name, p)), []).append(p)
    params = [{"params": ps, "lr": lrs[part], "weight_decay": weight_decay if decay else 0.0,
               "name": part if decay else f"{part}_no_decay"}
              for (part, decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    optimizer = torch.optim.AdamW(params, weight_decay=weight_decay)
    warmup = int(math.ceil(total_steps * warmup_ratio))
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))


_UNDECAYED_MODULES = (torch.nn.LayerNorm, torch.nn.Embedding, torch.nn.GroupNorm)


def decays(model, name: str, param) -> bool:
    """Whether weight decay applies to parameter `name`: matrices of Linear / Conv layers (LoRA's included)."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return param.ndim >= 2 and not isinstance(owner, _UNDECAYED_MODULES) and not name.endswith("query_tokens")
