"""Shared test fixtures: tiny random models built in code, audio generated here. CPU only, no download."""

import os

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
