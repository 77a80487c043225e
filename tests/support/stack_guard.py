"""Which Python stack the suite runs on, printed in the header and, for the Debian-stack
pass, enforced before any test runs.

``make test`` runs the unit and integration suites twice: in the venv (pip's packages) and
on Debian's own stack (scripts/debian-stack-test sets ``KEYHANDOFF_TEST_STACK=debian`` and
``KEYHANDOFF_TEST_STACK_DIR``).  In that pass the session fails at start unless the
interpreter is /usr/bin/python3 outside any venv, cryptography, cffi, pyudev and systemd
come from /usr/lib/python3/dist-packages, and keyhandoff with its compiled bindings comes
from the Debian build directory -- in this process and in a child started the way the
tests start the CLI and the agent (``sys.executable -m keyhandoff`` from the checkout,
where the checkout's own copy could shadow the build).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIST_PACKAGES = Path("/usr/lib/python3/dist-packages")
DEBIAN_PYTHON = Path("/usr/bin/python3")
#: module -> distribution whose version is printed
STACK = {"cryptography": "cryptography", "cffi": "cffi", "pyudev": "pyudev",
         "systemd": "systemd-python", "pytest": "pytest", "hypothesis": "hypothesis"}
EXTENSIONS = ("_cffi_backend", "cryptography.hazmat.bindings._rust")
BINDINGS = [f"keyhandoff._bindings._{n}" for n in ("keyutils", "linux", "efivar", "cryptsetup")]

#: Run in a child: where everything resolves (find_spec: the bindings are not loaded).
PROBE = f"""
import importlib.util, json, sys
names = {[*STACK, *EXTENSIONS, "keyhandoff", *BINDINGS]!r}
print(json.dumps({{n: importlib.util.find_spec(n).origin for n in names}}))
"""


def _origins() -> dict[str, str]:
    names = [*STACK, *EXTENSIONS, "keyhandoff", *BINDINGS]
    found = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        found[name] = spec.origin if spec is not None and spec.origin else "<missing>"
    return found


def _inside(path: str, directory: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


def _problems(origins: dict[str, str], build: Path, where: str) -> list[str]:
    expected = {**dict.fromkeys([*STACK, *EXTENSIONS], DIST_PACKAGES),
                **dict.fromkeys(["keyhandoff", *BINDINGS], build)}
    return [f"{where}: {name} from {origins[name]}, not {directory}"
            for name, directory in expected.items() if not _inside(origins[name], directory)]


def _check_debian_stack() -> list[str]:
    build = Path(os.environ.get("KEYHANDOFF_TEST_STACK_DIR", "<unset>"))
    problems = []
    if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PYTHON):
        problems.append(f"interpreter {sys.executable}, not {DEBIAN_PYTHON}")
    if sys.prefix != sys.base_prefix:
        problems.append(f"running inside a venv ({sys.prefix})")
    problems += _problems(_origins(), build, "pytest")
    child = subprocess.run([sys.executable, "-c", PROBE], cwd=Path(__file__).resolve().parents[2],
                           capture_output=True, text=True, timeout=60, check=False)
    if child.returncode != 0:
        problems.append(f"child interpreter failed: {child.stderr.strip()[-500:]}")
    else:
        problems += _problems(json.loads(child.stdout), build, "child")
    return problems


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def pytest_report_header(config):
    origins = _origins()
    stack = os.environ.get("KEYHANDOFF_TEST_STACK", "venv")
    python = f"python {sys.version.split()[0]} ({sys.executable}, prefix {sys.prefix})"
    lines = [f"keyhandoff stack: {stack}, {python}"]
    for name, dist in STACK.items():
        lines.append(f"  {name} {_version(dist)}: {origins[name]}")
    lines.append(f"  keyhandoff: {origins['keyhandoff']}")
    lines.append(f"  bindings: {os.path.dirname(origins[BINDINGS[0]])}")
    return lines


def pytest_sessionstart(session):
    if os.environ.get("KEYHANDOFF_TEST_STACK") != "debian":
        return
    problems = _check_debian_stack()
    if problems:
        pytest.exit("not Debian's own Python stack:\n  " + "\n  ".join(problems), 3)
