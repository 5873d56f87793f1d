"""Optional packages and subprocess output: what a test does when a package is missing, and how a failed
child process is shown."""

from __future__ import annotations

import os

import pytest


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


def tail(text, n: int = 6000) -> str:
    """The end of a child process's output (bytes or text), for an assertion message."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-n:]
