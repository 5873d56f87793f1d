"""Nested Hugging Face configs for EmoQ (BLIP-2 / Qwen2-Audio habit: one composite config, three sub-configs).

`EmoQConfig` holds the encoder's own config (`audio_config`, any HF audio model type), the
EmoQ-Former's (`qformer_config`) and the LLM's (`text_config`), plus everything the EmoQ paper
leaves open as fields with documented defaults, and the label map (`id2label`) so evaluation maps
predictions through the order the model was trained with, never through a re-derived one.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

PLACEHOLDER_TOKEN = "<|emoq|>"


class EmoQFormerConfig(PreTrainedConfig):
    """EmoQ-Former: BERT-style post-LN blocks over [queries ; transcript] with cross-attention to speech.

    cross_attention_frequency: a cross-attention sub-layer every k blocks (BLIP-2 uses 2; 1 = every block).
    text_hidden_size: width of the transcript token embeddings fed in (the LLM's embedding width; the
        transcript is embedded with the LLM's own frozen token table and projected, so no second vocabulary).
    window_seconds / frames_per_second: window-level queries (SALMONN): `num_query_tokens` queries per
        window of `window_seconds`; None = one set of queries for the whole clip.
    """

    model_type = "emoq_qformer"
    base_config_key = "qformer_config"

    hidden_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 384
    text_hidden_size: int = 576
    max_text_positions: int = 256
    num_query_tokens: int = 32
    window_seconds: float | None = None
    frames_per_second: float = 50.0


class EmoQConfig(PreTrainedConfig):
    """Composite config of EmoQForConditionalGeneration.

    encoder_layers: encoder hidden states fed forward ([] = last layer, [i] = layer i, several =
        learned softmax-weighted sum; index 0 is the embedding output).
    projector_type: "linear" or "mlp" (Linear-GELU-Linear) from Q-Former width to LLM width.
    contrastive_dim: output width of the projection head used by the supervised contrastive loss.
    lora: `peft.LoraConfig` arguments, same names (None = no LoRA); added at construction so a saved model
        reloads with `from_pretrained` alone.
    use_transcript: feed transcript tokens into the EmoQ-Former's self-attention when given.
    base_llm: where the frozen base LLM's weights come from (hub id, folder or builtin name). When set, a
        saved folder holds everything but those weights — the EmoQ-Former side, the heads, the projector
        and the LoRA weights — and loading rebuilds the LLM from this reference (as a peft adapter folder
        names its base model); None: the folder holds the whole LLM (a tiny in-code LLM, a merged export).
    base_llm_revision: the reference's hub commit when it was loaded from the hub, checked on reload.
    """

    model_type = "emoq"
    sub_configs_defaults = {
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="whisper"),
        "qformer_config": EmoQFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    audio_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    audio_token_id: int | None = None
    encoder_layers: list[int] | None = None
    freeze_encoder: bool = True
    projector_type: str = "linear"
    contrastive_dim: int = 128
    classifier_dropout: float = 0.1
    use_transcript: bool = True
    lora: dict | None = None
    base_llm: str | None = None
    base_llm_revision: str | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.encoder_layers = list(self.encoder_layers or [])
        self.qformer_config.num_query_tokens = self.num_query_tokens
        self.qformer_config.encoder_hidden_size = audio_hidden_size(self.audio_config)
        self.qformer_config.text_hidden_size = self.text_config.hidden_size
        if self.projector_type not in ("linear", "mlp"):
            raise ValueError(f"projector_type must be 'linear' or 'mlp', got {self.projector_type!r}")


def audio_hidden_size(audio_config: PreTrainedConfig) -> int:
    """Width of the encoder's hidden states (Whisper calls it d_model)."""
    return getattr(audio_config, "d_model", None) or audio_config.hidden_size
