"""Typed run configuration: dataclasses, YAML loading, dotted ``key=value`` overrides, strict validation.

Why strict: a misspelled key in a training YAML silently falling back to a default is the most
expensive bug a multi-GPU run can have. Every unknown key and every wrong type is an error that
names the key, the file it came from and the closest valid key.

Interpolation: string values may reference other values as ``${section.key}`` (resolved after
overrides are applied, so ``trainer.output_dir=...`` on the command line propagates).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the key and the source (file or command line) that caused it."""


@dataclass
class LoraConfig:
    """LoRA on the LLM only; `target_modules` are matched inside the language model (never the encoder).
    The fields other than `enabled` are `peft.LoraConfig`'s own, with the same names."""

    enabled: bool = True
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def peft_kwargs(self) -> dict | None:
        """The `peft.LoraConfig` arguments (what the model config stores), or None when LoRA is off."""
        if not self.enabled:
            return None
        return {k: (list(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(self).items()
                if k != "enabled"}


@dataclass
class QFormerConfig:
    """The EmoQ-Former's size and dropout; the fields are `EmoQFormerConfig`'s own, with the same names
    (`cross_attention_frequency`: a cross-attention sub-layer every k blocks; BLIP-2 uses 2)."""

    hidden_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    cross_attention_frequency: int = 1
    hidden_dropout_prob: float = 0.1


@dataclass
class ModelConfig:
    """What to build. Model references are HF hub ids, local folders or ``builtin:*`` names (see `emoq ls`)."""

    system: str = "emoq"  # emoq | qieemo | patamia
    encoder: str = "builtin:whisper-tiny.en"
    # Hidden layers of the encoder fed forward: [] = last layer; one index = that layer;
    # several indices = learned softmax-weighted sum of them (Qieemo: middle layers carry emotion).
    encoder_layers: list[int] = field(default_factory=list)
    freeze_encoder: bool = True
    llm: str = "builtin:smollm2-135m-instruct"
    num_query_tokens: int = 32
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # Window-level queries (SALMONN habit): None = one set of queries per clip, else queries per window.
    window_seconds: float | None = None
    use_transcript: bool = True
    # Whisper ASR model that transcribes clips arriving without a transcript at inference (emoq chat/predict/
    # serve, emoq eval --transcripts asr) when the model reads transcripts; null = never transcribe.
    asr: str | None = "builtin:whisper-tiny.en"
    projector: str = "linear"  # linear | mlp
    contrastive_dim: int = 128
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: str = "none"  # none | 4bit | 8bit  (bitsandbytes QLoRA)
    gradient_checkpointing: bool = False
    # Random-weight tiny models for tests: when set, encoder/llm refs are ignored and configs are built in code.
    tiny_random: bool = False
    # Baselines (system: qieemo | patamia; trained by recipes/train_baseline.py from the `stage1:` section).
    # Qieemo reads `encoder_layers[0]` as its feature layer ([] = the middle block); Patamia reads all of them.
    text_encoder: str | None = "builtin:all-minilm-l6-v2"  # patamia: BERT-style text encoder; null = audio only
    fusion_hidden_size: int = 256  # qieemo: MMF + cross-modal attention width; patamia: fusion MLP width
    fusion_num_heads: int = 4  # qieemo: cross-modal attention heads
    ppg_dim: int = 128  # qieemo: classes of the phonetic-posteriorgram head


@dataclass
class SplitNames:
    """The dataset's own names of the splits each stage reads (dataset: hf): many Hub datasets call dev
    `validation`."""

    train: str = "train"
    dev: str = "validation"
    test: str = "test"


@dataclass
class ColumnMap:
    """Which dataset columns hold what (dataset: hf); null = the dataset has no such column. `audio`, `label` and
    `text` must exist when named; `speaker`, `dialogue_id` and `key` are read where the dataset has them (rows of
    a dataset without the key column are named SPLIT/ROW)."""

    audio: str = "audio"
    label: str | None = "label"
    text: str | None = "text"
    speaker: str | None = "speaker"
    dialogue_id: str | None = "dialogue_id"
    key: str | None = "key"


@dataclass
class DataConfig:
    dataset: str = "meld"  # meld | iemocap | manifest | hf
    root: str | None = None
    # dataset: hf — `path` is a Hub id, a `save_to_disk` folder, an audiofolder-style folder (SPLIT/metadata.csv
    # or .jsonl with a file_name column) or a data-files pattern where {split} stands for the split name;
    # `name` the Hub configuration, `revision` a Hub commit/tag (pin it for reproducible runs)
    path: str | None = None
    name: str | None = None
    revision: str | None = None
    splits: SplitNames = field(default_factory=SplitNames)
    columns: ColumnMap = field(default_factory=ColumnMap)
    # the dataset's label (name, or ClassLabel name) -> a label of `label_set`, where their names differ
    label_map: dict[str, str] = field(default_factory=dict)
    # dataset: hf — read the training split as a stream (corpora larger than memory or disk): sharded by rank
    # and dataloader worker, length-grouped within a buffer of `stream_buffer` clips; needs trainer.max_steps
    streaming: bool = False
    stream_buffer: int = 256
    train_manifest: str | None = None
    eval_manifest: str | None = None
    test_manifest: str | None = None
    label_set: str = "meld7"
    fold: int = 5  # IEMOCAP leave-one-session-out: the held-out session
    # IEMOCAP has no dev split: this fraction of the training sessions' utterances (chosen by a hash of
    # the key, so the same for every run and process) is held out for dev selection. 0 = select on the
    # held-out session itself, as some papers do (a test-set leak; only for reproducing them).
    dev_fraction: float = 0.1
    max_seconds: float | None = 20.0
    use_transcript: bool = True
    # Stage 2 answers "label<newline>rationale" where a manifest row has a `rationale` field (a short
    # explanation); label scoring then scores "label<newline>". False: the answer is the label word.
    rationale: bool = False
    num_workers: int = 0
    class_balanced: bool = False
    # batches of clips of similar length (less padding); false: plain shuffled batches, for corpora whose clip
    # length follows the class (length groups would then be class groups)
    group_by_length: bool = True


@dataclass
class LossConfig:
    focal_weight: float = 1.0
    supcon_weight: float = 0.2
    lm_weight: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None
    temperature: float = 0.07


@dataclass
class TrainerConfig:
    """Settings shared by both stages. `max_steps > 0` overrides every stage's `epochs` (smoke runs)."""

    output_dir: str = "results/${run_name}/${seed}"
    max_steps: int = -1
    batch_size: int = 8
    eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    eval_every: int = 0  # optimiser steps; 0 = end of each epoch
    save_every: int = 0  # optimiser steps; 0 = end of each epoch
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True


@dataclass
class StageConfig:
    """What differs between stage 1 (EmoQ-Former + MAL) and stage 2 (LoRA LLM + soft prompts)."""

    epochs: float = 3.0
    learning_rate: float = 1e-4
    lr_qformer: float | None = None  # per-module-group learning rates (None = learning_rate)
    lr_lora: float | None = None
    output_dir: str = ""
    # stage 2: the stage-1 checkpoint it continues (LAVIS habit); by default `best`, the one dev selected
    init_from: str | None = None
    cache_encoder_features: bool = False


@dataclass
class RunConfig:
    """The whole run: one file drives both stages, `emoq run stage1_qformer|stage2_llm --config FILE`."""

    run_name: str = "emoq"
    seed: int = 42
    debug: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stage1: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=10.0, learning_rate=1e-3, output_dir="${trainer.output_dir}/stage1")
    )
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(
            epochs=3.0, learning_rate=2e-4, output_dir="${trainer.output_dir}/stage2", init_from="${stage1.output_dir}/best"
        )
    )


# --------------------------------------------------------------------------- building from dicts


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; allow int -> float only. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' is a section and expects a mapping, got {value!r}")
        return _build(tp, value, source, prefix=f"{key}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        _, value_tp = typing.get_args(tp)
        # YAML reads `0: neutral` with an int key; a label id is named by its text
        return {str(k): _coerce(v, value_tp, f"{key}.{k}", source) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    if tp is Any:
        return value
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, valid: list[str], source: str, prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")


def _build(cls: type, data: dict, source: str, prefix: str = ""):
    """Build `cls` from `data`; a section given in part keeps the parent's defaults for the rest
    (e.g. `stage1: {epochs: 5}` keeps stage 1's default learning rate and output folder)."""
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(key, list(fields), source, prefix)
        tp, f = hints[key], fields[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            base = dataclasses.asdict(f.default_factory())
            value = _merge(base, value)
        kwargs[key] = _coerce(value, tp, prefix + key, source)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides + interpolation


class ConfigLoader(yaml.SafeLoader):
    """YAML as YAML 1.2 reads booleans: only true / false. PyYAML's YAML 1.1 default also reads no / yes /
    on / off as booleans, which turned `mixed_precision: no` (accelerate's own spelling) into False."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _parse_override_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` with YAML rules (``1e-4``, ``null``, ``[1,2]``, ``true``)."""
    try:
        return yaml.load(text, Loader=ConfigLoader) if text != "" else ""
    except yaml.YAMLError:
        return text


def _set_dotted(data: dict, cls: type, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node, node_cls, prefix = data, cls, ""
    for part in parts[:-1]:
        fields = _fields(node_cls)
        if part not in fields or not dataclasses.is_dataclass(typing.get_type_hints(node_cls)[part]):
            raise _unknown_key_error(part, list(fields), source, prefix)
        node_cls = typing.get_type_hints(node_cls)[part]
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: '{prefix}{part}' is not a section")
        prefix += part + "."
    if parts[-1] not in _fields(node_cls):
        raise _unknown_key_error(parts[-1], list(_fields(node_cls)), source, prefix)
    node[parts[-1]] = _coerce(value, typing.get_type_hints(node_cls)[parts[-1]], dotted, source)


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _lookup(cfg: Any, dotted: str, key: str, source: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(node) or part not in _fields(type(node)):
            raise ConfigError(f"{source}: '{key}' references unknown key '${{{dotted}}}'")
        node = getattr(node, part)
    return node


def _interpolate(cfg: Any, root: Any, source: str, prefix: str = "") -> None:
    for name in _fields(type(cfg)):
        value = getattr(cfg, name)
        if dataclasses.is_dataclass(value):
            _interpolate(value, root, source, prefix + name + ".")
        elif isinstance(value, str) and "${" in value:
            for _ in range(10):  # references may chain; bounded to catch cycles
                new = _REF.sub(lambda m, key=prefix + name: str(_lookup(root, m.group(1), key, source)), value)
                if new == value:
                    break
                value = new
            else:
                raise ConfigError(f"{source}: '{prefix}{name}' has circular references")
            setattr(cfg, name, value)


# --------------------------------------------------------------------------- public API


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = RunConfig):
    """Load a YAML file (or defaults when `path` is None), apply ``a.b=c`` overrides, validate, interpolate."""
    source = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=ConfigLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, cls, key.strip(), _parse_override_value(raw), "command line")
    cfg = _build(cls, data, source)
    _interpolate(cfg, cfg, source)
    validate(cfg, source)
    return cfg


_CHOICES = {
    "model.system": ("emoq", "qieemo", "patamia"),
    "model.quantization": ("none", "4bit", "8bit"),
    "model.projector": ("linear", "mlp"),
    "data.dataset": ("meld", "iemocap", "manifest", "hf"),
    "trainer.mixed_precision": ("no", "bf16", "fp16"),
}


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Semantic checks that types alone cannot express."""
    for dotted, choices in _CHOICES.items():
        value = _lookup(cfg, dotted, dotted, source)
        if value not in choices:
            raise ConfigError(f"{source}: '{dotted}' must be one of {list(choices)}, got {value!r}")
    m = cfg.model
    if m.qformer.hidden_size % m.qformer.num_attention_heads:
        raise ConfigError(f"{source}: 'model.qformer.hidden_size' must be divisible by "
                          "'model.qformer.num_attention_heads'")
    for key, value in (("num_query_tokens", m.num_query_tokens), ("qformer.num_hidden_layers", m.qformer.num_hidden_layers),
                       ("qformer.cross_attention_frequency", m.qformer.cross_attention_frequency)):
        if value < 1:
            raise ConfigError(f"{source}: 'model.{key}' must be >= 1")
    if m.system == "qieemo" and (m.fusion_hidden_size % m.fusion_num_heads or len(m.encoder_layers) > 1):
        raise ConfigError(f"{source}: qieemo needs 'model.fusion_hidden_size' divisible by 'model.fusion_num_heads' "
                          "and at most one 'model.encoder_layers' entry (its feature layer)")
    if m.window_seconds is not None and m.window_seconds <= 0:
        raise ConfigError(f"{source}: 'model.window_seconds' must be positive or null")
    if not 0.0 <= cfg.data.dev_fraction < 1.0:
        raise ConfigError(f"{source}: 'data.dev_fraction' must be in [0, 1), got {cfg.data.dev_fraction}")
    if cfg.data.dataset == "hf" and not cfg.data.path:
        raise ConfigError(f"{source}: data.dataset hf needs 'data.path' (a Hub id, a save_to_disk folder, an "
                          "audiofolder-style folder or data files)")
    if cfg.data.streaming and (cfg.data.dataset != "hf" or cfg.trainer.max_steps < 1):
        raise ConfigError(f"{source}: 'data.streaming' reads a dataset hf and needs 'trainer.max_steps' (a stream "
                          "has no length to count epochs by)")
    if cfg.data.streaming and (cfg.data.num_workers or cfg.stage1.cache_encoder_features):
        raise ConfigError(f"{source}: 'data.streaming' reads the stream in the main process (its position is saved "
                          "for an exact resume) and never caches it: set 'data.num_workers: 0' and "
                          "'stage1.cache_encoder_features: false'")
    if cfg.data.stream_buffer < 1:
        raise ConfigError(f"{source}: 'data.stream_buffer' must be >= 1")
    if cfg.trainer.batch_size < 1 or cfg.trainer.gradient_accumulation_steps < 1:
        raise ConfigError(f"{source}: 'trainer.batch_size' and 'trainer.gradient_accumulation_steps' must be >= 1")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (SpeechBrain habit: every results folder holds the config that made it)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
