"""Tiny random models and an offline tokenizer, built in code (transformers' habit for tests).

Used by the test-suite and by `configs/emoq/tiny_test.yaml` so recipes can be exercised end to end on
CPU in seconds, with no download. Nothing here is a real model.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast, WhisperConfig, WhisperFeatureExtractor

from ..audio import SAMPLE_RATE
from .emoq.configuration_emoq import PLACEHOLDER_TOKEN

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CORPUS = (
    "system user assistant You are an expert listener. What emotion does the speaker express? "
    "Answer with one word from: neutral, surprise, fear, sadness, joy, disgust, anger. "
    "neutral surprise fear sadness joy disgust anger happy angry sad excited positive negative "
    "Transcript: the weather report said it would rain tomorrow. I will take the train at noon. "
    "The quick brown fox jumps over the lazy dog. Describe the tone of the voice and the feeling. "
)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, with a ChatML template and pad/eos tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_whisper_config(**overrides) -> WhisperConfig:
    kwargs = dict(
        d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=80,
        max_source_positions=1500, vocab_size=64, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1, begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    kwargs.update(overrides)
    return WhisperConfig(**kwargs)


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=None,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_qformer_config(**overrides) -> dict:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    kwargs.update(overrides)
    return kwargs


def whisper_feature_extractor() -> WhisperFeatureExtractor:
    """Whisper's log-mel front end (80 bins, 16 kHz); needs no download."""
    return WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE)


__all__ = [
    "PLACEHOLDER_TOKEN",
    "tiny_tokenizer",
    "tiny_whisper_config",
    "tiny_llama_config",
    "tiny_qformer_config",
    "whisper_feature_extractor",
]


SSL_ENCODERS = ("hubert", "wavlm", "wav2vec2")


def tiny_ssl_config(kind: str = "hubert", **overrides):
    """A 2-layer wav2vec2-family encoder (HuBERT, WavLM or wav2vec2) with layer-norm feature extraction
    (padding-safe, like the large checkpoints users fine-tune from)."""
    from transformers import HubertConfig, Wav2Vec2Config, WavLMConfig

    config_class = {"hubert": HubertConfig, "wavlm": WavLMConfig, "wav2vec2": Wav2Vec2Config}[kind]
    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 64), conv_kernel=(10, 64), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def build_tiny(
    labels: list[str],
    num_query_tokens: int = 4,
    lora: dict | None = None,
    window_seconds: float | None = None,
    encoder: str = "whisper",  # or one of SSL_ENCODERS
    encoder_layers: list[int] | None = None,
    seed: int = 0,
    text_config=None,
    qformer: dict | None = None,
    **config_kwargs,
):
    """(EmoQForConditionalGeneration, EmoQProcessor) with random tiny weights, built offline in seconds.

    `text_config`: another tiny LLM config (vocabulary: the tiny tokenizer's) instead of the Llama one;
    `qformer`: EmoQ-Former settings over the tiny ones (a run config's `model.qformer`); other keyword
    arguments are EmoQConfig fields (`contrastive_dim`, `projector_type`, ...)."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor

    from .emoq.configuration_emoq import EmoQConfig
    from .emoq.modeling_emoq import EmoQForConditionalGeneration
    from .emoq.processing_emoq import EmoQProcessor

    tok = tiny_tokenizer()
    if encoder == "whisper":
        audio_config, fe = tiny_whisper_config(), whisper_feature_extractor()
    else:
        audio_config = tiny_ssl_config(encoder)
        fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True, return_attention_mask=True)
    processor = EmoQProcessor.for_encoder(
        fe, tok, labels, audio_config, num_query_tokens=num_query_tokens, window_seconds=window_seconds
    )
    config = EmoQConfig(
        audio_config=audio_config,
        text_config=text_config or tiny_llama_config(len(tok)),
        qformer_config=tiny_qformer_config(**(qformer or {}), window_seconds=window_seconds,
                                           frames_per_second=processor.frames_per_second),
        num_query_tokens=num_query_tokens,
        audio_token_id=processor.audio_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        lora=lora,
        encoder_layers=encoder_layers,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    model = EmoQForConditionalGeneration(config)
    fan_in_init(model.speech_encoder.encoder)
    return model, processor


def fan_in_init(encoder) -> None:
    """HF's N(0, 0.02) init makes a random 32-wide encoder all but ignore its input; PyTorch's default
    (fan-in scaled) init keeps the input's differences, so tiny tests can learn from what they hear."""
    import torch

    for module in encoder.modules():
        if isinstance(module, torch.nn.Conv1d | torch.nn.Linear):
            module.reset_parameters()


def tiny_bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=256)


def build_tiny_baseline(system: str, labels: list[str], seed: int = 0, with_text: bool = True):
    """(Qieemo | Patamia model, BaselineProcessor) with random tiny weights, built offline in seconds.

    Qieemo: tiny Whisper encoder (audio only). Patamia: tiny HuBERT (wav2vec2 family) + tiny BERT over
    the offline BPE tokenizer (`with_text=False`: audio only)."""
    import torch
    from transformers import Wav2Vec2FeatureExtractor

    from .baselines.patamia import PatamiaConfig, PatamiaForEmotionClassification
    from .baselines.processing_baseline import BaselineProcessor
    from .baselines.qieemo import QieemoConfig, QieemoForEmotionClassification

    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(seed)
    if system == "qieemo":
        audio_config = tiny_whisper_config()
        config = QieemoConfig(audio_config=audio_config, id2label=id2label, label2id=label2id, ppg_dim=16,
                              hidden_size=32, num_attention_heads=4, contrastive_dim=16)
        model = QieemoForEmotionClassification(config)
        processor = BaselineProcessor.for_encoder(whisper_feature_extractor(), labels, audio_config)
    elif system == "patamia":
        audio_config = tiny_ssl_config("hubert")
        tok = tiny_tokenizer() if with_text else None
        config = PatamiaConfig(audio_config=audio_config, text_config=tiny_bert_config(len(tok)) if tok else None,
                               id2label=id2label, label2id=label2id, fusion_hidden_size=32, contrastive_dim=16)
        model = PatamiaForEmotionClassification(config)
        fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, do_normalize=True, return_attention_mask=True)
        processor = BaselineProcessor.for_encoder(fe, labels, audio_config, tokenizer=tok)
    else:
        raise ValueError(f"unknown baseline system {system!r}; choose qieemo or patamia")
    fan_in_init(model.speech_encoder.encoder)
    return model, processor
