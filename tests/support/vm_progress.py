"""The VM harness's progress lines when tests/vm runs on pytest-xdist workers.

A worker's own output never reaches the terminal (xdist shows it only in a failure's report),
and a boot takes minutes: without this, ``make test`` would be silent for most of an hour and a
failure's figures would be lost with the worker.  The controller makes a file, names it in the
environment its workers inherit, and copies each line the workers append to its terminal,
prefixed with the worker's id, while the run goes on.  Without xdist (or with ``-n 0``) nothing
here runs: tests/vm/conftest.py writes to the terminal itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

ENV = "KEYHANDOFF_VM_PROGRESS"
_POLL_SECONDS = 0.5


def worker_sink() -> tuple[str, Path] | None:
    """``(worker id, file)`` in an xdist worker whose controller copies lines; else None."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = os.environ.get(ENV)
    if not worker or not path:
        return None
    return worker, Path(path)


def write_line(sink: tuple[str, Path], line: str) -> None:
    """Append one whole line (O_APPEND: lines of two workers never interleave)."""
    worker, path = sink
    data = f"[vm {worker}] {line}\n".encode(errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class _Forwarder:
    def __init__(self, config: pytest.Config) -> None:
        self._config = config
        self._dir = Path(tempfile.mkdtemp(prefix="keyhandoff-vm-progress-"))
        self.path = self._dir / "progress.log"
        self.path.touch(mode=0o600)
        self._offset = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="vm-progress", daemon=True)

    def start(self) -> None:
        os.environ[ENV] = str(self.path)
        self._thread.start()

    def _drain(self) -> None:
        with self._lock:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # only whole lines; the rest is read next time
            self._offset += end
            reporter: Any = self._config.pluginmanager.get_plugin("terminalreporter")
            for line in data[:end].decode(errors="replace").splitlines():
                if reporter is not None:
                    reporter.write_line(line)

    def _run(self) -> None:
        while not self._stop.wait(_POLL_SECONDS):
            self._drain()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        os.environ.pop(ENV, None)
        shutil.rmtree(self._dir, ignore_errors=True)


_forwarder: _Forwarder | None = None


def _distributed(config: pytest.Config) -> bool:
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.pluginmanager.hasplugin("xdist"):
        return False
    workers = getattr(config.option, "numprocesses", None)
    return bool(workers) and getattr(config.option, "dist", "no") != "no"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    global _forwarder  # noqa: PLW0603 - one forwarder per pytest process
    if _distributed(config):
        _forwarder = _Forwarder(config)
        _forwarder.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _forwarder  # noqa: PLW0603
    del config
    if _forwarder is not None:
        with contextlib.suppress(OSError):
            _forwarder.stop()
        _forwarder = None
