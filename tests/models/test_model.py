"""EmoQ model core: padding invariance, placeholder injection, save/load, LoRA training, label masking."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from emoq.models import EmoQForConditionalGeneration, PlaceholderCountError
from emoq.models.speech_encoder import SpeechEncoder
from emoq.models.tiny import tiny_whisper_config

TRANSCRIPTS = ["the weather report", None, "I will take the train at noon"]


def _batch(processor, clips, **kwargs):
    return processor(clips, transcripts=TRANSCRIPTS[: len(clips)], **kwargs)


def _one(processor, clips, i, **kwargs):
    return processor(clips[i : i + 1], transcripts=TRANSCRIPTS[i : i + 1], **kwargs)


def _score(model, processor, batch):
    return model.score_labels(
        batch["input_ids"], batch["attention_mask"], batch["input_features"], processor.label_candidates(),
        batch["feature_attention_mask"], batch.get("transcript_ids"), batch.get("transcript_attention_mask"),
    )


@pytest.mark.parametrize("encoder,window", [("whisper", None), ("whisper", 0.5), ("hubert", None), ("wavlm", None),
                                            ("wav2vec2", None), ("hubert", 0.5)])
def test_batch_of_n_equals_batch_of_one(tiny, clips, encoder, window):
    model, processor = tiny(encoder=encoder, window_seconds=window, lora={"r": 4})
    batch = _batch(processor, clips, answers=["joy", "neutral", "anger"])
    with torch.no_grad():
        out = model(**batch)
    scores = _score(model, processor, _batch(processor, clips))
    gen = model.generate(**_batch(processor, clips, padding_side="left"), max_new_tokens=4, do_sample=False)
    for i in range(len(clips)):
        one = _one(processor, clips, i, answers=[["joy", "neutral", "anger"][i]])
        with torch.no_grad():
            out1 = model(**one)
        n = int(one["attention_mask"].sum())
        torch.testing.assert_close(out1.logits[0, :n], out.logits[i, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out1.emotion_logits[0], out.emotion_logits[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_score(model, processor, _one(processor, clips, i))[0], scores[i], atol=1e-4, rtol=1e-5)
        gen1 = model.generate(**_one(processor, clips, i, padding_side="left"), max_new_tokens=4, do_sample=False)
        assert gen1[0].tolist() == gen[i].tolist()


@pytest.mark.parametrize("shared_prompt", [True, False], ids=["kv-cache", "full-rows"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_label_scores_are_the_log_likelihood_of_each_full_answer(tiny, clips, padding_side, shared_prompt,
                                                                monkeypatch):
    """score_labels against the definition: the sum of log p(answer token | everything before) from one
    plain LLM pass over prompt + answer, per clip and label — both for the shared-prompt KV-cache path and
    for the one-pass-per-row path that LLMs with linear-attention caches take."""
    import emoq.models.emoq.modeling_emoq as modeling

    if not shared_prompt:
        monkeypatch.setattr(modeling, "_SHAREABLE_CACHE_LAYERS", ())
    model, processor = tiny(lora={"r": 4})
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA active, so the reference must go through it too
        scores = _score(model, processor, _batch(processor, clips, padding_side=padding_side))
        table = model.get_input_embeddings()
        for i in range(len(clips)):
            one = _one(processor, clips, i)
            embeds, _, _ = model.get_inputs_embeds(
                one["input_ids"], one["input_features"], one["feature_attention_mask"],
                one.get("transcript_ids"), one.get("transcript_attention_mask"),
            )
            prompt = embeds.shape[1]
            for label, cand in enumerate(processor.label_candidates()):
                full = torch.cat([embeds[0], table(torch.tensor(cand))], 0)[None]
                logp = model.language_model(inputs_embeds=full).logits[0].float().log_softmax(-1)
                reference = sum(float(logp[prompt - 1 + j, t]) for j, t in enumerate(cand))
                assert abs(float(scores[i, label]) - reference) < 1e-4, (i, label, float(scores[i, label]), reference)


def test_label_scores_with_sliding_window_attention_do_not_depend_on_batching(clips):
    """A sliding-window LLM (Mistral) whose window is shorter than the padding between prompts of different
    lengths (window-level queries: 8 vs 20 soft-prompt tokens): batched scores equal scores alone."""
    from transformers import MistralConfig

    from emoq.models.tiny import build_tiny, tiny_tokenizer

    mistral = MistralConfig(vocab_size=len(tiny_tokenizer()), hidden_size=48, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                            max_position_embeddings=1024)
    model, processor = build_tiny(["neutral", "joy", "anger"], window_seconds=0.5, text_config=mistral)
    model.eval()
    batch = processor(clips)  # right padding, as the eval collator and EmotionRecognizer produce
    assert (batch["attention_mask"].sum(1).max() - batch["attention_mask"].sum(1).min()) > 8
    scores = _score(model, processor, batch)
    for i in range(len(clips)):
        alone = _score(model, processor, processor(clips[i : i + 1]))
        torch.testing.assert_close(alone[0], scores[i], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "granite"])
def test_label_scores_follow_the_llms_own_final_logits(clips, family):
    """LLMs that transform logits after the LM head (Gemma 2 soft-capping, Granite scaling): label scores
    equal the log-likelihood under the model's own `forward` logits."""
    from transformers import Gemma2Config, GraniteConfig

    from emoq.models.tiny import build_tiny, tiny_tokenizer

    common = dict(vocab_size=len(tiny_tokenizer()), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    text_config = (Gemma2Config(**common, head_dim=12, final_logit_softcapping=0.5) if family == "gemma2"
                   else GraniteConfig(**common, logits_scaling=4.0))
    model, processor = build_tiny(["neutral", "joy", "anger"], text_config=text_config)
    model.eval()
    one = processor(clips[:1])
    with torch.no_grad():
        scores = _score(model, processor, one)[0]
        embeds, _, _ = model.get_inputs_embeds(one["input_ids"], one["input_features"], one["feature_attention_mask"])
        table, prompt = model.get_input_embeddings(), embeds.shape[1]
        for label, cand in enumerate(processor.label_candidates()):
            full = torch.cat([embeds[0], table(torch.tensor(cand))], 0)[None]
            logp = model.language_model(inputs_embeds=full).logits[0].float().log_softmax(-1)
            reference = sum(float(logp[prompt - 1 + j, t]) for j, t in enumerate(cand))
            assert abs(float(scores[label]) - reference) < 1e-4, (family, label, float(scores[label]), reference)


def test_window_queries_scale_with_duration(tiny, clips):
    model, processor = tiny(window_seconds=0.5)
    batch = _batch(processor, clips)
    placeholders = (batch["input_ids"] == processor.audio_token_id).sum(1).tolist()
    # 1.0 s, 1.5 s, 2.5 s of audio -> 2, 3, 5 windows of 0.5 s, 4 queries each
    assert placeholders == [8, 12, 20]
    queries, mask = model.encode_speech(batch["input_features"], batch["feature_attention_mask"])
    assert mask.sum(1).tolist() == placeholders


def test_placeholder_count_mismatch_is_a_clear_error(tiny, clips):
    model, processor = tiny()
    batch = _batch(processor, clips[:1])
    ids = batch["input_ids"].clone()
    first = int((ids[0] == processor.audio_token_id).nonzero()[0])
    ids[0, first] = processor.tokenizer.pad_token_id
    with pytest.raises(PlaceholderCountError, match="3 '<\\|emoq\\|>' placeholder tokens but .* 4 query"):
        model(input_features=batch["input_features"], feature_attention_mask=batch["feature_attention_mask"],
              input_ids=ids, attention_mask=batch["attention_mask"])


def test_labels_cover_only_the_assistant_answer(tiny, clips):
    _, processor = tiny()
    batch = processor(clips[:2], transcripts=TRANSCRIPTS[:2], answers=["joy", "anger"])
    tok = processor.tokenizer
    for row in range(2):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        supervised = labels != -100
        # the supervised tokens are exactly the answer the chat template appends, token by token
        answer = tok.decode(ids[supervised])
        assert answer == ["joy", "anger"][row] + "<|im_end|>\n"
        assert torch.equal(ids[supervised], labels[supervised])
        # and every prompt token (system, user, placeholders, assistant header) is masked
        prompt = tok.decode(ids[~supervised & batch["attention_mask"][row].bool()])
        assert prompt.endswith("<|im_start|>assistant\n") and "<|emoq|>" in prompt


def test_save_and_load_round_trip_gives_identical_outputs(tiny, clips, tmp_path):
    model, processor = tiny(lora={"r": 4})
    with torch.no_grad():  # make LoRA-B non-zero so the adapter matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(processor, clips, answers=["joy", "neutral", "anger"])
    with torch.no_grad():
        ref = model(**batch)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    model.save_adapter(tmp_path / "m" / "adapter")
    loaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, EmoQForConditionalGeneration)
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), type(model.config))
    assert loaded.config.id2label == {0: "neutral", 1: "joy", 2: "anger"}
    half = EmoQForConditionalGeneration.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.language_model.dtype == torch.bfloat16  # the LLM in bf16 ...
    assert {p.dtype for p in half.qformer.parameters()} == {torch.float32}  # ... the EmoQ-Former kept fp32
    with torch.no_grad():
        out = loaded(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.emotion_logits, ref.emotion_logits, atol=0, rtol=0)
    # the adapter folder is standard PEFT: config + safetensors with non-zero LoRA-B
    adapter_cfg = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and adapter_cfg["r"] == 4
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "m" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    # ... and peft itself loads it onto the plain base LLM: same logits as the LLM inside EmoQ
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM(model.config.text_config)
    plain = {k.replace(".base_layer", ""): v for k, v in model.language_model.state_dict().items() if "lora_" not in k}
    base.load_state_dict(plain)
    peft_llm = PeftModel.from_pretrained(base, tmp_path / "m" / "adapter").eval()
    ids = batch["input_ids"].clamp(max=base.config.vocab_size - 1)
    with torch.no_grad():
        torch.testing.assert_close(peft_llm(input_ids=ids).logits, model.language_model(input_ids=ids).logits)


def test_one_step_with_gradient_checkpointing_trains_the_right_parts(tiny, clips):
    model, processor = tiny(lora={"r": 4})
    model.train()
    model.gradient_checkpointing_enable()
    assert model.language_model.model.gradient_checkpointing
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = _batch(processor, clips, answers=["joy", "neutral", "anger"])
    out = model(**batch, emotion_labels=torch.tensor([1, 0, 2]))
    out.loss.backward()
    opt.step()

    def changed(prefix):
        names = [n for n in before if n.startswith(prefix) or prefix in n]
        assert names, prefix
        return {n: not torch.equal(before[n], dict(model.named_parameters())[n]) for n in names}

    assert all(changed("lora_B").values())
    assert all(changed("qformer.query_tokens").values())
    assert any(changed("qformer.layers").values())
    assert all(changed("projector").values())
    assert not any(changed("speech_encoder.encoder").values())
    base = {n: v for n, v in changed("language_model").items() if "lora_" not in n}
    assert base and not any(base.values())


def test_whisper_wrapper_matches_stock_encoder_at_30s_and_runs_at_3s():
    torch.manual_seed(0)
    config = tiny_whisper_config(max_source_positions=1500)
    wrapper = SpeechEncoder(config).eval()
    stock = WhisperEncoder(config).eval()
    stock.load_state_dict(wrapper.encoder.state_dict())
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        ours, mask = wrapper(mel)
        ref = stock(mel).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert mask.all()
    with torch.no_grad():
        short, mask = wrapper(torch.randn(1, 80, 300))  # 3 s: no padding to 30 s
    assert short.shape == (1, 150, 32) and mask.all()


def test_learned_layer_mix_and_single_layer_selection(tiny, clips):
    model, processor = tiny(encoder_layers=[1, 2])
    assert model.speech_encoder.layer_weights is not None and model.speech_encoder.layer_weights.requires_grad
    batch = processor(clips[:1])
    frames, _ = model.speech_encoder(batch["input_features"], batch["feature_attention_mask"])
    model1, _ = tiny(encoder_layers=[1])
    assert model1.speech_encoder.layer_weights is None
    assert frames.shape[-1] == 32


def test_merging_the_adapter_goes_through_peft_and_keeps_the_logits(tiny, clips, monkeypatch):
    from peft.tuners.lora import LoraModel

    model, processor = tiny(lora={"r": 4})
    with torch.no_grad():
        for p in model.adapter_parameters():
            p.normal_(0, 0.5)  # LoRA-B non-zero: the merge really changes the base weights
    batch = processor(clips, answers=["joy", "neutral", "anger"])
    with torch.no_grad():
        before = model(**batch).logits
    merges = []
    original = LoraModel.merge_and_unload
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: merges.append(kw) or original(self, **kw))
    model.merge_adapter()
    assert merges == [{"safe_merge": True}]  # peft's own merge, with its NaN check
    assert model.config.lora is None and model.peft_model is None and not model.adapter_parameters()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-4, rtol=1e-4)
