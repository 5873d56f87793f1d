"""GPU checks at real model sizes with random weights (no download): bf16 training, QLoRA, throughput.

    python bench/gpu_check.py [--size small|real] [--steps 5] [--qlora]

- builds EmoQ with a Whisper-small-sized encoder and a Qwen2.5-0.5B-sized LLM (random weights,
  configs built in code), LoRA on the LLM, gradient checkpointing;
- trains a few steps in bf16 autocast: the loss must stay finite, the EmoQ-Former must stay fp32
  (bf16 overflow in attention), LoRA-B must move and the frozen encoder must not;
- measures training and label-scoring throughput on 3 s clips, and 3 s vs 30 s encoder cost;
- with --qlora (needs bitsandbytes + CUDA): loads the LLM in 4-bit nf4 and repeats the step check.
Prints one markdown table; `--size small` runs the same checks on CPU in seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "real"], default="real")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--qlora", action="store_true")
    args = parser.parse_args()
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
