"""EmoQForConditionalGeneration: speech encoder -> EmoQ-Former -> projector -> soft prompts in a LoRA LLM.

Data flow: frames from the (frozen) encoder are summarised by the EmoQ-Former
into query states; a projector maps them to the LLM's width and they replace the expanded
`<|emoq|>` placeholder tokens of the prompt with `masked_scatter` (Qwen2-Audio habit: the processor
expands the placeholder, the model checks the count — no "concat in front and guess the padding").

Three outputs serve the three uses:
- `forward` -> LM loss + MAL terms (focal on the classification head, SupCon on the projection head);
- `score_labels` -> log-likelihood of every label answer: the prompts once, the answers read their cache (classification
  without free generation, so no hallucinated labels and no exact-match scoring);
- `generate` -> free text, batched with left padding.

LoRA is injected into the LLM at construction from `config.lora`, so a saved model reloads with
`from_pretrained` alone; `save_adapter` also writes the LLM adapter in PEFT format.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.utils import ModelOutput

from ...config import LoraConfig as LoraSettings
from ...config import LossConfig
from ..losses import MALoss, heads_outside_loss
from ..speech_encoder import SpeechEncoder, load_audio_encoder
from .configuration_emoq import EmoQConfig
from .qformer import EmoQFormer


class PlaceholderCountError(ValueError):
    """The prompt's `<|emoq|>` tokens and the EmoQ-Former's query states do not match in number."""


@dataclass
class EmoQOutput(ModelOutput):
    """`loss` = lm_weight * lm_loss + focal_weight * focal_loss + supcon_weight * supcon_loss (terms present).

    No KV-cache field: decoding runs through the LLM's own `generate` (see `generate`), and transformers
    renamed that field (`past_key_values` -> `cache`) within 5.x, so carrying it would pin a minor version.
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    focal_loss: torch.Tensor | None = None
    supcon_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    emotion_logits: torch.Tensor | None = None
    contrastive_features: torch.Tensor | None = None


def load_language_model(llm: str, quantization: str = "none", dtype: torch.dtype | None = None,
                        compute_dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """The causal LLM from a hub id or folder; "4bit" (nf4, double quantisation) / "8bit" load it through
    bitsandbytes and prepare it for k-bit training (QLoRA). `dtype`: the unquantized parts' dtype;
    `compute_dtype`: 4-bit matmuls (default `dtype`, else bf16); `device`: where quantized weights are
    placed (bitsandbytes weights are not moved afterwards; default: the current CUDA device, else CPU)."""
    llm_kwargs: dict = {"dtype": dtype} if dtype is not None else {}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        llm_kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype or dtype or torch.bfloat16,
            )
            if quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        elif not isinstance(device, int):
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            device = str(device)
        llm_kwargs["device_map"] = {"": device}
    language_model = AutoModelForCausalLM.from_pretrained(llm, **llm_kwargs)
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        language_model = prepare_model_for_kbit_training(language_model, use_gradient_checkpointing=False)
    return language_model


#: cache layer types that hold only keys and values, so a prompt's cache can be repeated per label
_SHAREABLE_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def is_quantized_folder(path) -> bool:
    """Whether a saved EmoQ folder was trained with a bitsandbytes-quantized LLM (QLoRA)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    text_config = json.loads(config.read_text(encoding="utf-8")).get("text_config") or {}
    return bool(text_config.get("quantization_config"))


def references_base_llm(path) -> bool:
    """Whether a saved EmoQ folder leaves its base LLM's weights out and names them (`config.base_llm`)."""
    config = Path(path) / "config.json"
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("base_llm"))


def _read_weights(folder: Path, wanted) -> dict[str, torch.Tensor]:
    """The tensors of a `save_pretrained` folder whose names pass `wanted`, read one by one (single file or
    sharded with an index), so a large LLM that is about to be replaced is never loaded."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
             if index.is_file() else ["model.safetensors"])
    tensors = {}
    for name in files:
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                if wanted(key):
                    tensors[key] = f.get_tensor(key)
    return tensors


def _final_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What some causal LMs apply after their LM head (so label scores are the model's own distribution):
    Granite divides by `logits_scaling`, Cohere multiplies by `logit_scale`, Gemma 2/3 soft-cap."""
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _cache_kwarg(decoder: nn.Module) -> str:
    """Name under which the decoder's forward takes a KV cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier 5.x)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class EmoQPreTrainedModel(PreTrainedModel):
    config_class = EmoQConfig
    base_model_prefix = "emoq"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    _keep_in_fp32_modules_strict = ["qformer"]  # strict: kept fp32 under bf16 loads too (fp16/bf16 attention in a Q-Former overflows)
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, EmoQFormer):
            module.query_tokens.data.normal_(0.0, std)


def _projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    return nn.Linear(d_in, d_out)


class EmoQForConditionalGeneration(EmoQPreTrainedModel, GenerationMixin):
    def __init__(
        self,
        config: EmoQConfig,
        language_model: nn.Module | None = None,
        audio_encoder: nn.Module | None = None,
    ):
        super().__init__(config)
        self.speech_encoder = SpeechEncoder(config.audio_config, config.encoder_layers, frozen=config.freeze_encoder)
        if audio_encoder is not None:
            self.speech_encoder.encoder = audio_encoder.requires_grad_(not config.freeze_encoder)
        self.qformer = EmoQFormer(config.qformer_config)
        h = config.qformer_config.hidden_size
        num_labels = len(config.id2label) if config.id2label else 0
        self.classifier = nn.Sequential(nn.Dropout(config.classifier_dropout), nn.Linear(h, max(num_labels, 1)))
        self.contrastive_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, config.contrastive_dim))
        self.projector = _projector(config.projector_type, h, config.text_config.hidden_size)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        # the PeftModel around the LLM (see `_add_lora`); not a registered submodule
        object.__setattr__(self, "peft_model", self._add_lora(config.lora) if config.lora else None)
        self.loss_config = LossConfig()  # the run config's `loss:` section, set by the recipe (not saved)
        self.post_init()

    # ------------------------------------------------------------------ construction helpers

    def _add_lora(self, lora: dict):
        """LoRA through peft's own model class: `get_peft_model` puts the adapter layers into the LLM in place
        (base weights frozen) and returns the `PeftModel` around it, which then does what peft does —
        `save_pretrained` (adapter folders `PeftModel.from_pretrained` loads), `merge_and_unload`. The LLM
        itself stays `self.language_model`, so checkpoint keys and the LLM's tied weights are the plain LLM's
        with or without an adapter. `lora`: `peft.LoraConfig` arguments (`model.lora` of a run config);
        target module names only match inside the LLM, the one model the adapter goes into."""
        import dataclasses

        from peft import LoraConfig, get_peft_model

        unknown = set(lora) - {f.name for f in dataclasses.fields(LoraConfig)}
        if unknown:
            raise ValueError(f"lora settings {sorted(unknown)} are not peft.LoraConfig fields (LoRA takes peft's own "
                             "names: r, lora_alpha, lora_dropout, target_modules, ...)")
        settings = {**LoraSettings().peft_kwargs(), **lora}
        # LoRA weights are kept in fp32 whatever the LLM's dtype (peft's default), so an optimiser step on a
        # bf16 LLM updates full-precision adapters
        return get_peft_model(self.language_model, LoraConfig(**settings, bias="none"))

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights in the LLM, as peft's tuner layers list them (what stage 2 trains in the LLM)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        params = []
        for module in self.language_model.modules():
            if isinstance(module, BaseTunerLayer):
                for name in module.adapter_layer_names:
                    params += list(getattr(module, name).parameters())
        return params

    def merge_adapter(self) -> None:
        """Fold the LoRA deltas into the LLM's base weights with peft's `merge_and_unload` (safe merge: a
        non-finite result raises); afterwards the model has no LoRA layers and `config.lora` is None."""
        if self.peft_model is None:
            raise ValueError("the model has no LoRA adapter to merge")
        self.language_model = self.peft_model.merge_and_unload(safe_merge=True)
        object.__setattr__(self, "peft_model", None)
        self.config.lora = None
        self.config.base_llm = self.config.base_llm_revision = None  # the merged weights are no longer the base's

    @classmethod
    def from_components(
        cls,
        encoder: str,
        llm: str,
        *,
        id2label: dict[int, str],
        audio_token_id: int,
        qformer: dict | None = None,
        lora: dict | None = None,
        quantization: str = "none",
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> EmoQForConditionalGeneration:
        """Build a fresh EmoQ model around pretrained encoder and LLM weights (hub ids or local folders).

        quantization "4bit"/"8bit" loads the LLM with bitsandbytes (QLoRA) and prepares it for k-bit training.
        """
        text_config = AutoConfig.from_pretrained(llm)
        audio_config = AutoConfig.from_pretrained(encoder)
        config = EmoQConfig(
            audio_config=audio_config,
            text_config=text_config,
            qformer_config=qformer or {},
            id2label=dict(id2label),
            label2id={v: k for k, v in id2label.items()},
            audio_token_id=audio_token_id,
            lora=lora,
            **config_kwargs,
        )
        language_model = load_language_model(llm, quantization, dtype)
        audio_encoder = load_audio_encoder(encoder, **({"dtype": dtype} if dtype is not None else {}))
        model = cls(config, language_model=language_model, audio_encoder=audio_encoder)
        model.config.text_config = language_model.config
        return model

    @classmethod
    def from_stage1(
        cls, folder: str | Path, llm: str, *, lora: dict | None, quantization: str = "none",
        dtype: torch.dtype | None = None,
    ) -> EmoQForConditionalGeneration:
        """Stage 2's start for QLoRA (or another LoRA shape): the stage-1 folder's speech encoder,
        EmoQ-Former, heads and projector around the LLM loaded from `llm` (hub id or folder) — 4-bit/8-bit
        when asked — with a fresh `lora`.

        Stage 1 never changes the LLM, so its own weights are the stage-1 model's; loading them through
        bitsandbytes is what makes a QLoRA stage 2 possible (a plain `from_pretrained` of the stage-1
        folder would load the LLM in full precision).
        """
        config = EmoQConfig.from_pretrained(folder)
        config.lora = lora
        return cls._around_llm(folder, config, llm, quantization, dtype, with_lora_weights=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, except for a folder trained with a 4-bit/8-bit LLM (QLoRA),
        which goes through `from_quantized` (a plain load would quantize the speech side too), and a folder
        that references its base LLM instead of holding it (`config.base_llm`), rebuilt around it."""
        folder = pretrained_model_name_or_path
        device = kwargs.get("device_map")
        device = device if isinstance(device, str | torch.device | int) else None
        if is_quantized_folder(folder):
            return cls.from_quantized(folder, dtype=kwargs.get("dtype"), device=device)
        if references_base_llm(folder):
            config = EmoQConfig.from_pretrained(folder)
            return cls._around_llm(folder, config, config.base_llm, "none", kwargs.get("dtype"),
                                   with_lora_weights=True, device=device)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`; with `config.base_llm` set, the base LLM's weights are left out
        (they are the reference's, unchanged by training) and only the LoRA weights of the LLM are kept —
        a checkpoint of a 7B run is then megabytes, not 15 GB."""
        if self.config.base_llm:
            state_dict = self.state_dict() if state_dict is None else state_dict
            adapters = {name for name, p in self.named_parameters()
                        if id(p) in {id(q) for q in self.adapter_parameters()}}
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("language_model.") or k in adapters}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @classmethod
    def from_quantized(cls, folder: str | Path, dtype: torch.dtype | None = None,
                       device: str | torch.device | int | None = None) -> EmoQForConditionalGeneration:
        """Reload a model trained with a 4-bit/8-bit LLM (QLoRA): the base LLM is quantized again from its
        own reference (`text_config._name_or_path`, with the recorded bitsandbytes settings), then the saved
        speech side and LoRA weights are loaded — bitsandbytes' packed weights are never read back, so
        the result is exactly the trained model (same quantization of the same base weights)."""
        config = EmoQConfig.from_pretrained(folder)
        q = dict(config.text_config.quantization_config)
        if q.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(f"{folder}: the LLM was quantized with {q['quant_method']}; emoq reloads "
                             "bitsandbytes (QLoRA) models only")
        quantization = "4bit" if q.get("load_in_4bit") or q.get("_load_in_4bit") else "8bit"
        llm = config.base_llm or getattr(config.text_config, "_name_or_path", None)
        if not llm:
            raise ValueError(f"{folder}: a quantized LLM was trained but its base model is not recorded "
                             "(text_config._name_or_path)")
        compute = q.get("bnb_4bit_compute_dtype")
        compute = getattr(torch, compute.replace("torch.", ""), None) if isinstance(compute, str) else None
        return cls._around_llm(folder, config, llm, quantization, dtype, with_lora_weights=True,
                               compute_dtype=compute, device=device)

    @classmethod
    def _around_llm(cls, folder, config: EmoQConfig, llm: str, quantization: str, dtype, with_lora_weights: bool,
                    compute_dtype: torch.dtype | None = None, device=None):
        """The model of `config` (read from `folder`, LoRA as wanted) around the LLM `llm`, with the folder's
        weights outside the LLM (and its LoRA weights when `with_lora_weights`)."""
        from ...hub import resolve_model

        folder = Path(folder)
        try:
            language_model = load_language_model(resolve_model(llm), quantization, dtype, compute_dtype, device)
        except OSError as err:
            raise ValueError(f"{folder}: cannot load its base LLM '{llm}' ({err}); it must be reachable (hub id "
                             "or folder) to rebuild the model around it") from None
        saved, loaded = config.text_config, language_model.config
        for key in ("model_type", "hidden_size", "num_hidden_layers"):
            if getattr(saved, key, None) != getattr(loaded, key, None):
                raise ValueError(f"{folder} was trained with an LLM whose {key} is {getattr(saved, key, None)}, "
                                 f"but '{llm}' has {getattr(loaded, key, None)}: model.llm must name the same LLM")
        revision = getattr(loaded, "_commit_hash", None)
        if config.base_llm_revision and revision and revision != config.base_llm_revision:
            raise ValueError(f"{folder} was trained on '{llm}' at revision {config.base_llm_revision}, but the copy "
                             f"found is revision {revision}: the base weights changed")
        model = cls(config, language_model=language_model)
        model.config.text_config = language_model.config

        adapter_ids = {id(p) for p in model.adapter_parameters()} if with_lora_weights else set()
        adapter_keys = {name for name, p in model.named_parameters() if id(p) in adapter_ids}

        def wanted(key: str) -> bool:
            return not key.startswith("language_model.") or key in adapter_keys

        missing, unexpected = model.load_state_dict(_read_weights(folder, wanted), strict=False)
        missing = [k for k in missing if wanted(k)]
        if missing or unexpected:
            raise ValueError(f"{folder}: saved weights do not fit the model built from its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model

    # ------------------------------------------------------------------ HF plumbing

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None):
        # the LLM and the EmoQ-Former recompute their blocks in backward; the frozen encoder keeps no activations
        self.qformer.gradient_checkpointing = enable
        if enable:
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.language_model.gradient_checkpointing_disable()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self):
        self._set_gradient_checkpointing(False)

    def modules_outside_loss(self, loss: LossConfig) -> dict[str, list[nn.Parameter]]:
        """Parameters no term of the loss reaches under these settings, by part: the EmoQ-Former's transcript
        side without transcripts, the contrastive head without SupCon, the classifier without focal loss, the
        projector and LoRA without the LLM's token loss. They must not be trainable: under DDP a trainable
        parameter without a gradient stops the run."""
        parts = heads_outside_loss(loss, self.classifier, self.contrastive_head)
        if not self.config.use_transcript:
            parts["qformer (transcript side)"] = [p for m in self.qformer.text_modules() for p in m.parameters()]
        if loss.lm_weight == 0:
            parts["projector"] = list(self.projector.parameters())
            parts["LoRA"] = self.adapter_parameters()
        return parts

    def save_adapter(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write the LLM's LoRA weights in PEFT format (adapter_config.json + adapter_model.safetensors).

        `state_dict`: the whole model's state dict, already gathered (ZeRO-3); default: this process's weights.
        """
        from peft.utils import get_peft_model_state_dict

        if self.peft_model is None:
            raise ValueError("the model has no LoRA adapter to save")
        self.peft_model.peft_config["default"].base_model_name_or_path = getattr(
            self.language_model.config, "_name_or_path", None)
        # this model's keys (language_model.<LLM key>) as the PeftModel around the LLM names them
        llm_state = None if state_dict is None else {
            "base_model.model." + k.removeprefix("language_model."): v.detach().cpu()
            for k, v in state_dict.items() if k.startswith("language_model.")
        }
        if not get_peft_model_state_dict(self.peft_model, state_dict=llm_state):
            # an empty adapter file would load silently as "no LoRA"
            raise RuntimeError(f"{path}: no LoRA weights found in the state dict to save; "
                               "was it gathered (ZeRO-3) and left unmodified?")
        # the embeddings are never adapted here; without this, peft would look the base model up (on the Hub)
        self.peft_model.save_pretrained(str(path), state_dict=llm_state, save_embedding_layers=False)

    # ------------------------------------------------------------------ the speech path

    def encode_speech(
        self,
        input_features: torch.Tensor | None,
        feature_attention_mask: torch.Tensor | None = None,
        transcript_ids: torch.Tensor | None = None,
        transcript_attention_mask: torch.Tensor | None = None,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query states [B, Nq*, H] (fp32) and their validity mask [B, Nq*].

        `encoder_frames`/`encoder_frame_mask` (cached outputs of the frozen encoder) skip the encoder.
        """
        if encoder_frames is not None:
            frames, frame_mask = encoder_frames, encoder_frame_mask.bool()
        else:
            frames, frame_mask = self.speech_encoder(input_features, feature_attention_mask)
        text_embeds = None
        if self.config.use_transcript and transcript_ids is not None and transcript_ids.shape[1] > 0:
            # the transcript is embedded with the LLM's own (frozen) token table: no second vocabulary
            text_embeds = self.get_input_embeddings()(transcript_ids).detach()
            if transcript_attention_mask is None:
                transcript_attention_mask = torch.ones_like(transcript_ids)
        return self.qformer(frames, frame_mask, text_embeds, transcript_attention_mask)

    def emotion_heads(self, queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits [B, C], contrastive features [B, D]) from the masked mean of the query states."""
        weights = query_mask.to(queries.dtype)[..., None]
        pooled = (queries * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(pooled), self.contrastive_head(pooled)

    def merge_inputs_embeds(self, input_ids: torch.Tensor, queries: torch.Tensor, query_mask: torch.Tensor):
        """LLM input embeddings with the projected query states written over the `<|emoq|>` placeholders."""
        placeholder = input_ids == self.config.audio_token_id
        # the placeholder id may lie past the LLM's vocabulary (no resize needed): look up a harmless id instead
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholder, 0))
        n_placeholders, n_queries = int(placeholder.sum()), int(query_mask.sum())
        if n_placeholders != n_queries:
            raise PlaceholderCountError(
                f"the prompt holds {n_placeholders} '<|emoq|>' placeholder tokens but the EmoQ-Former produced "
                f"{n_queries} query embeddings; build inputs with EmoQProcessor so the placeholder is expanded "
                f"to num_query_tokens={self.config.num_query_tokens} per clip (per window with window_seconds)"
            )
        per_row = placeholder.sum(1)
        if not torch.equal(per_row, query_mask.sum(1)):
            raise PlaceholderCountError(
                f"placeholders per row {per_row.tolist()} != query embeddings per clip {query_mask.sum(1).tolist()}"
            )
        projected = self.projector(queries[query_mask].to(self.projector_dtype)).to(embeds.dtype)
        return embeds.masked_scatter(placeholder[..., None].expand_as(embeds), projected)

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def get_inputs_embeds(
        self,
        input_ids,
        input_features,
        feature_attention_mask=None,
        transcript_ids=None,
        transcript_attention_mask=None,
    ):
        queries, query_mask = self.encode_speech(
            input_features, feature_attention_mask, transcript_ids, transcript_attention_mask
        )
        return self.merge_inputs_embeds(input_ids, queries, query_mask), queries, query_mask

    # ------------------------------------------------------------------ forward / scoring / generation

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        transcript_ids: torch.Tensor | None = None,
        transcript_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        emotion_labels: torch.Tensor | None = None,
        encoder_frames: torch.Tensor | None = None,
        encoder_frame_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> EmoQOutput:
        """Stage 1 (no `input_ids`): speech path + heads + MAL. Stage 2: the same plus the LLM and its loss.

        Other keyword arguments (`use_cache`, the KV cache, ...) go to the LLM unchanged."""
        emotion_logits = features = None
        if input_features is not None or encoder_frames is not None:
            queries, query_mask = self.encode_speech(
                input_features, feature_attention_mask, transcript_ids, transcript_attention_mask,
                encoder_frames, encoder_frame_mask,
            )
            emotion_logits, features = self.emotion_heads(queries, query_mask)
            if input_ids is not None and inputs_embeds is None:
                inputs_embeds = self.merge_inputs_embeds(input_ids, queries, query_mask)
        llm_out = None
        if inputs_embeds is not None or input_ids is not None:
            llm_out = self.language_model(
                input_ids=None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                **kwargs,
            )
        mal = MALoss.from_config(self.loss_config)(
            logits=emotion_logits if emotion_labels is not None else None,
            labels=emotion_labels,
            features=features if emotion_labels is not None else None,
            lm_loss=llm_out.loss if llm_out is not None else None,
        ) if (emotion_labels is not None or labels is not None) else None
        return EmoQOutput(
            loss=mal.loss if mal is not None else None,
            lm_loss=llm_out.loss if llm_out is not None else None,
            focal_loss=mal.focal if mal is not None else None,
            supcon_loss=mal.supcon if mal is not None else None,
            logits=llm_out.logits if llm_out is not None else None,
            emotion_logits=emotion_logits,
            contrastive_features=features,
        )

    @torch.no_grad()
    def score_labels(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        input_features: torch.Tensor,
        candidate_ids: list[list[int]],
        feature_attention_mask: torch.Tensor | None = None,
        transcript_ids: torch.Tensor | None = None,
        transcript_attention_mask: torch.Tensor | None = None,
        normalize: str = "sum",
    ) -> torch.Tensor:
        """Log-likelihood [B, L] of each candidate answer (token ids of label + end of turn) after each prompt.

        Two LLM passes: the B prompts once, keeping their KV cache; then the B x L candidate answers (a few
        tokens each) reading that cache, repeated per label. The prompt — soft prompts, system text,
        question — is not recomputed per label, so scoring costs about one prompt pass plus one short
        pass. Prompts are left-aligned here whatever their padding, with positions from the mask, so a
        row scores the same alone or in a batch (sliding-window attention included). LLMs whose cache is
        not a plain KV cache (linear-attention / conv layers) take one pass over every [prompt ;
        answer] row instead. Only hidden states at answer positions go through the LM head.
        `normalize="mean"` divides by the candidate's token count.
        """
        from transformers import DynamicCache

        embeds, _, _ = self.get_inputs_embeds(
            input_ids, input_features, feature_attention_mask, transcript_ids, transcript_attention_mask
        )
        mask = attention_mask.long()
        order = torch.argsort(mask, dim=1, stable=True)  # padding first, real tokens in order after it
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        mask = mask.gather(1, order)
        device, (batch, num_labels) = embeds.device, (embeds.shape[0], len(candidate_ids))
        cache = DynamicCache(config=self.language_model.config)
        if not all(type(layer) in _SHAREABLE_CACHE_LAYERS for layer in getattr(cache, "layers", [])):
            scores = self._score_full_rows(embeds, mask, candidate_ids)
        else:
            scores = self._score_with_shared_prompt(embeds, mask, candidate_ids, cache)
        if normalize == "mean":
            scores = scores / torch.tensor([len(c) for c in candidate_ids], device=device).repeat(batch)
        return scores.view(batch, num_labels)

    def _score_with_shared_prompt(self, embeds, mask, candidate_ids, cache) -> torch.Tensor:
        """[B*L] answer log-likelihoods: prompts (left-aligned) once into `cache`, then all answers reading it."""
        device, (batch, num_labels) = embeds.device, (embeds.shape[0], len(candidate_ids))
        decoder = self.language_model.base_model
        cache_arg = {_cache_kwarg(decoder): cache}
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, **cache_arg).last_hidden_state
        prompt_last = hidden[:, -1]  # left-aligned: every row's last prompt token; predicts answer token 0
        lengths = torch.tensor([len(c) for c in candidate_ids], device=device)
        cands = nn.utils.rnn.pad_sequence([torch.tensor(c, device=device) for c in candidate_ids], batch_first=True)
        cand_mask = (torch.arange(cands.shape[1], device=device)[None] < lengths[:, None]).long()  # [L, C]
        cache.batch_repeat_interleave(num_labels)  # row b*L + l: prompt b, then candidate l
        cand_embeds = self.get_input_embeddings()(cands).to(embeds.dtype).repeat(batch, 1, 1)  # [B*L, C, D]
        full_mask = torch.cat([mask.repeat_interleave(num_labels, 0), cand_mask.repeat(batch, 1)], dim=1)
        positions = mask.sum(-1).repeat_interleave(num_labels)[:, None] + torch.arange(cands.shape[1], device=device)
        cand_hidden = decoder(inputs_embeds=cand_embeds, attention_mask=full_mask, position_ids=positions,
                              use_cache=True, **cache_arg).last_hidden_state  # [B*L, C, D]
        # the hidden state before answer token j: the prompt's last for j = 0, answer token j-1 after that
        before = torch.cat([prompt_last.repeat_interleave(num_labels, 0)[:, None], cand_hidden[:, :-1]], dim=1)
        return self._answer_log_likelihoods(before, cands.repeat(batch, 1), cand_mask.repeat(batch, 1).bool())

    def _score_full_rows(self, embeds, mask, candidate_ids) -> torch.Tensor:
        """[B*L] answer log-likelihoods from one pass over every left-aligned [prompt ; answer] row (for LLMs
        whose cache cannot be shared between rows: linear attention, convolutions)."""
        device, batch = embeds.device, embeds.shape[0]
        num_labels, longest = len(candidate_ids), max(len(c) for c in candidate_ids)
        # right-pad each answer, then move the padding to the row's front: the row stays left-aligned
        cands = torch.stack([torch.tensor(c + [0] * (longest - len(c)), device=device) for c in candidate_ids])
        cand_mask = (torch.arange(longest, device=device)[None] < torch.tensor([len(c) for c in candidate_ids],
                                                                                device=device)[:, None]).long()
        rows = torch.cat([embeds.repeat_interleave(num_labels, 0),
                          self.get_input_embeddings()(cands).to(embeds.dtype).repeat(batch, 1, 1)], dim=1)
        row_mask = torch.cat([mask.repeat_interleave(num_labels, 0), cand_mask.repeat(batch, 1)], dim=1)
        order = torch.argsort(row_mask, dim=1, stable=True)
        rows, row_mask = rows.gather(1, order[..., None].expand_as(rows)), row_mask.gather(1, order)
        hidden = self.language_model.base_model(
            inputs_embeds=rows, attention_mask=row_mask, position_ids=(row_mask.cumsum(-1) - 1).clamp(min=0),
        ).last_hidden_state
        answer_len = cand_mask.sum(-1).repeat(batch)  # each row ends with its answer's real tokens
        width = rows.shape[1]
        start = width - answer_len  # index of answer token 0
        offsets = torch.arange(longest, device=device)[None]
        before_idx = (start[:, None] - 1 + offsets).clamp(max=width - 1)
        before = hidden.gather(1, before_idx[..., None].expand(-1, -1, hidden.shape[-1]))
        return self._answer_log_likelihoods(before, cands.repeat(batch, 1), cand_mask.repeat(batch, 1).bool())

    def _answer_log_likelihoods(self, before: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Sum over each row's valid answer tokens of log p(token | hidden state before it): [rows]."""
        logits = _final_logits(self.language_model.config, self.get_output_embeddings()(before[valid]).float())
        token_logp = logits.log_softmax(-1).gather(-1, targets[valid][:, None]).squeeze(-1)
        row_idx = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
        return torch.zeros(valid.shape[0], device=valid.device).index_add_(0, row_idx, token_logp)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        transcript_ids: torch.Tensor | None = None,
        transcript_attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Free-text answers (only the new tokens). Use left padding for batches (EmoQProcessor does)."""
        embeds, _, _ = self.get_inputs_embeds(
            input_ids, input_features, feature_attention_mask, transcript_ids, transcript_attention_mask
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)
