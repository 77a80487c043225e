"""The fuzzers in fuzz/ (scripts, not a package), loaded from their files for bounded runs.

Loaded by path, not by putting fuzz/ on ``sys.path``; what they import from beside them
(fuzz/fuzzlib.py) is loaded the same way first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
#: the fuzzers' shared module, imported by name from beside them
SHARED = "fuzzlib"


def load(name: str) -> ModuleType:
    """fuzz/<name>.py as a module (registered in ``sys.modules`` under its name)."""
    if name in sys.modules:
        return sys.modules[name]
    if name != SHARED:
        load(SHARED)
    spec = importlib.util.spec_from_file_location(name, FUZZ / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
