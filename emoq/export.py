"""`emoq export`: a trained model as a self-contained Hugging Face folder with a model card.

The folder holds everything needed to use the model without the training output:
  config.json, model.safetensors   EmoQForConditionalGeneration.from_pretrained(out) / AutoModel (after
                                   `import emoq.models`, which registers the EmoQ classes)
  processor files                  EmoQProcessor.from_pretrained(out) (feature extractor, tokenizer, prompt)
  labels.json                      the label map in id order (the order the model was trained with)
  README.md                        model card: labels, base encoder/LLM, how to load and classify, metrics
  adapter/                         (without --merge-lora) the LLM's LoRA in PEFT format
  metrics.json, run_config.yaml    copied when given (--metrics) / present next to the weights

--merge-lora folds the LoRA deltas into the LLM's base weights with peft's `merge_and_unload`
and sets `config.lora = None`: the export has no LoRA modules and scores as the original does.
The folder is written next to its destination and renamed into place when complete.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from .files import atomic_folder

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------ model card


def label_list(config) -> list[str]:
    """Labels in id order (config.id2label, keys may be ints or strings)."""
    return [config.id2label[k] for k in sorted(config.id2label, key=int)]


def base_models(config, folders: list[Path]) -> dict[str, str | None]:
    """Base encoder / LLM names: the sub-configs' `_name_or_path`, else the run config or the adapter."""
    names = {
        "encoder": getattr(config.audio_config, "_name_or_path", None) or None,
        "llm": getattr(config.text_config, "_name_or_path", None) or None,
    }
    for folder in folders:
        run_config = folder / "run_config.yaml"
        if not all(names.values()) and run_config.is_file():
            import yaml

            try:
                model_cfg = (yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}).get("model") or {}
            except (yaml.YAMLError, AttributeError):
                model_cfg = {}
            names["encoder"] = names["encoder"] or model_cfg.get("encoder") or None
            names["llm"] = names["llm"] or model_cfg.get("llm") or None
        adapter_config = folder / "adapter" / "adapter_config.json"
        if not names["llm"] and adapter_config.is_file():
            names["llm"] = json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path") or None
    return names


def _describe(sub_config) -> str:
    parts = [f"`{sub_config.model_type}`"]
    for key in ("d_model", "hidden_size"):
        if getattr(sub_config, key, None):
            parts.append(f"width {getattr(sub_config, key)}")
            break
    layers = getattr(sub_config, "num_hidden_layers", None) or getattr(sub_config, "encoder_layers", None)
    if layers:
        parts.append(f"{layers} layers")
    return ", ".join(parts)


def model_card(name: str, model, labels: list[str], bases: dict, merged: bool, lora: dict | None,
               metrics: dict | None):
    """The export's `huggingface_hub.ModelCard`: metadata (library, task, tags, hub base models) + the text."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    hub_bases = [b for b in (bases["encoder"], bases["llm"]) if b and HUB_ID.match(b) and not Path(b).exists()]
    data = ModelCardData(library_name="emoq", pipeline_tag="audio-classification",
                         tags=["speech-emotion-recognition", "emoq", "audio"], base_model=hub_bases or None)
    n_params = sum(p.numel() for p in model.parameters())
    if merged:
        lora_line = "merged into the LLM's weights (`emoq export --merge-lora`); the model has no LoRA layers"
    elif lora:
        lora_line = (f"kept as LoRA layers (r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}, targets "
                     f"{lora.get('target_modules')}); also in PEFT format under `adapter/`")
    else:
        lora_line = "none (the LLM was not LoRA-tuned)"
    lines = [
        f"# {name}",
        "",
        "Speech emotion recognition with emoq (EmoQ): a speech encoder, an EmoQ-Former "
        "that summarises its frames into query tokens, and an LLM that answers with the emotion label. "
        "Classification scores every label's answer under the LLM (no free generation), so the prediction "
        "is always one of the labels below.",
        "",
        "## Labels (in id order)",
        "",
        "| id | label |",
        "|---|---|",
        *[f"| {i} | {label} |" for i, label in enumerate(labels)],
        "",
        "The same map is in `labels.json` and in `config.json` (`id2label`).",
        "",
        "## Model",
        "",
        f"- speech encoder: {('`' + bases['encoder'] + '`') if bases['encoder'] else 'unknown'} "
        f"({_describe(config.audio_config)}, frozen)",
        f"- LLM: {('`' + bases['llm'] + '`') if bases['llm'] else 'unknown'} ({_describe(config.text_config)})",
        f"- EmoQ-Former: {config.qformer_config.num_hidden_layers} layers, width {config.qformer_config.hidden_size}, "
        f"{config.num_query_tokens} query tokens"
        + (f" per {config.qformer_config.window_seconds:g} s window" if config.qformer_config.window_seconds else ""),
        f"- LoRA: {lora_line}",
        f"- transcripts: {'used when given' if config.use_transcript else 'not used'}",
        f"- parameters: {n_params:,} (LLM in {next(model.language_model.parameters()).dtype})",
        "",
        "## How to use",
        "",
        "```bash",
        "pip install emoq",
        "emoq predict --model PATH --out predictions.jsonl clip1.wav clip2.mp3",
        "```",
        "",
        "```python",
        "from emoq.inference import EmotionRecognizer",
        "",
        'rec = EmotionRecognizer.from_pretrained("PATH")',
        'result = rec.classify("clip.wav")  # a path, encoded bytes, or (array, sample_rate)',
        'print(result["label"], result["scores"])  # label and {label: probability}',
        "```",
        "",
        "Lower level, with the transformers Auto classes:",
        "",
        "```python",
        "import emoq.models  # registers the EmoQ classes with AutoConfig / AutoModel",
        "from transformers import AutoModel",
        "from emoq.audio import load_audio",
        "from emoq.models import EmoQProcessor",
        "",
        'model = AutoModel.from_pretrained("PATH").eval()',
        'processor = EmoQProcessor.from_pretrained("PATH")',
        'batch = processor([load_audio("clip.wav")])',
        "loglik = model.score_labels(batch['input_ids'], batch['attention_mask'], batch['input_features'],",
        "                            processor.label_candidates(), batch['feature_attention_mask'])",
        "print(model.config.id2label[int(loglik.argmax(-1))])",
        "```",
    ]
    if not merged and lora:
        lines += [
            "",
            "`adapter/` holds only the LLM's LoRA (PEFT format, `PeftModel.from_pretrained(llm, 'PATH/adapter')`); "
            "the speech encoder, EmoQ-Former and projector weights are in `model.safetensors`.",
        ]
    lines += ["", "## Evaluation", ""]
    if metrics is None:
        lines.append("No evaluation metrics were given at export time (`emoq eval` writes them; "
                     "`emoq export --metrics metrics.json` puts them here).")
    else:
        from .evaluation.metrics import format_metrics_table

        protocol = metrics.get("protocol") or {}
        if protocol:
            lines.append(f"Data: {protocol.get('dataset', '?')} ({protocol.get('split', '?')}), "
                         f"mode: {protocol.get('mode', '?')}; scored {metrics.get('rows_ok', '?')} of "
                         f"{metrics.get('rows_total', '?')} rows ({metrics.get('rows_error', 0)} could not be loaded).")
            lines.append("")
        headline = [("accuracy (WA)", "accuracy"), ("unweighted accuracy (UA)", "unweighted_accuracy"),
                    ("weighted F1", "weighted_f1"), ("macro F1", "macro_f1")]
        if metrics.get("per_class") and all(k in metrics for _, k in headline) and "num_samples" in metrics:
            lines.append(format_metrics_table(metrics))
        elif any(isinstance(metrics.get(k), int | float) for _, k in headline):
            lines += ["| metric | value |", "|---|---|",
                      *[f"| {name} | {metrics[k] * 100:.2f} |" for name, k in headline
                        if isinstance(metrics.get(k), int | float)]]
        else:
            lines.append("(the metrics file holds no scored results)")
        lines += ["", "Full metrics (per class, confusion matrix, protocol): `metrics.json`."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


# ------------------------------------------------------------------ export


def _read_metrics(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"emoq export: cannot read metrics from {path}: {err}") from None
    if not isinstance(metrics, dict):
        raise SystemExit(f"emoq export: {path} does not hold a JSON object of metrics")
    return metrics


def export_model(model_dir: str | Path, out: str | Path, merge: bool = False, metrics_path: str | Path | None = None,
                 force: bool = False) -> Path:
    """Write the export folder (see the module docstring) and return its path."""
    import torch

    from .inference import weights_folder
    from .models import EmoQForConditionalGeneration, EmoQProcessor

    source = weights_folder(model_dir).resolve()
    model_type = json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "emoq":
        raise SystemExit(f"emoq export: {source} holds a {model_type} model; export writes EmoQ models (LoRA, "
                         "prompt processor). A baseline's weights folder is already an HF folder: "
                         "`import emoq.models; AutoModel.from_pretrained(folder)`")
    out = Path(out).resolve()
    if source == out or source.is_relative_to(out):
        raise SystemExit(f"emoq export: --out {out} would overwrite the model being exported ({source})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SystemExit(f"emoq export: {out} exists and is not empty (use --force to replace it)")
    metrics = _read_metrics(metrics_path) if metrics_path is not None else None

    model = EmoQForConditionalGeneration.from_pretrained(source).eval()
    processor = EmoQProcessor.from_pretrained(source)
    labels = label_list(model.config)
    if list(processor.labels) != labels:
        print(f"emoq export: warning: processor labels {processor.labels} differ from config.id2label {labels}",
              file=sys.stderr)
    bases = base_models(model.config, [source, Path(model_dir)])
    lora = dict(model.config.lora) if model.config.lora else None
    if merge and not lora:
        print("emoq export: the model has no LoRA layers; --merge-lora has nothing to merge", file=sys.stderr)
    if bases["llm"] and not getattr(model.language_model.config, "_name_or_path", None):
        model.language_model.config._name_or_path = bases["llm"]  # recorded in adapter_config.json

    with atomic_folder(out) as tmp, torch.no_grad():
        if merge and lora:
            model.merge_adapter()
        elif lora:
            model.save_adapter(tmp / "adapter")
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        label_map = {"labels": labels, "id2label": {str(i): label for i, label in enumerate(labels)},
                     "label2id": {label: i for i, label in enumerate(labels)}}
        (tmp / "labels.json").write_text(json.dumps(label_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for folder in (source, Path(model_dir)):
            if (folder / "run_config.yaml").is_file():
                shutil.copyfile(folder / "run_config.yaml", tmp / "run_config.yaml")
                break
        if metrics is not None:
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
        model_card(out.name, model, labels, bases, merged=bool(merge and lora), lora=lora,
                   metrics=metrics).save(tmp / "README.md")
    return out
