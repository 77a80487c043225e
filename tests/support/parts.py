"""The real parts a test needs: skip loudly when one is missing, fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(condition: bool, what: str, install: str) -> None:
    """Skip loudly with the install command when a real part is missing (fail in CI)."""
    if condition:
        return
    message = f"{what} is missing; install with: {install}"
    if IN_CI:
        pytest.fail(f"CI must have every real part: {message}")
    pytest.skip(message)


def require_binary(name: str, install: str) -> str:
    path = shutil.which(name)
    require(path is not None, name, install)
    assert path is not None
    return path
