"""Run the real agent (``python -m keyhandoff agent``) and real queriers for tests.

Also a pytest plugin (tests/conftest.py): the ``querier`` fixture, real queriers that are
ended after the test without leaving files in the shared ask directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support.parts import require_binary

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

ASK_DIR = Path("/run/systemd/ask-password")
INSTALL_SYSTEMD = "apt-get install systemd"


class AgentProcess:
    """The agent as a child process with its own config; stderr collected for scans."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        retain: int = 60,
        wait_for_update: str | None = None,
        ask_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``retain`` is the capture timeout exactly: automatic arming is off unless
        ``wait_for_update`` (a TOML value, e.g. ``'"2h"'``) is given, which turns it on."""
        self.keyname = f"kh-test-cryptsetup-{uuid.uuid4().hex[:12]}"
        self.config = tmp_path / "keyhandoff.conf"
        ask = f'ask_dir = "{ask_dir}"\n' if ask_dir is not None else ""
        wait = "" if wait_for_update is None else f"wait_for_update = {wait_for_update}\n"
        auto = "false" if wait_for_update is None else "true"
        self.config.write_text(
            f"[capture]\nretain = {retain}\n{wait}[update]\nauto_arm = {auto}\n"
            f'[agent]\nsystemd_keyname = "{self.keyname}"\n' + ask,
        )
        self.ask_dir = ask_dir or ASK_DIR
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._env = env or {}

    def __enter__(self) -> AgentProcess:
        ASK_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KEYHANDOFF_LOG": "stderr", **self._env}
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keyhandoff", "agent", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        self.wait_for_log("STARTED")
        return self

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log.read_text(errors="replace")
            if text in content:
                return content
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"agent exited {self.proc.returncode}: {content[-2000:]}")
            time.sleep(0.02)
        pytest.fail(f"agent log lacks {text!r}: {self.log.read_text()[-2000:]}")

    def wait_for_count(self, text: str, count: int, timeout: float = 10) -> None:
        """Wait until ``text`` appears ``count`` times (the log line follows the answer)."""
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count(text) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"agent log has fewer than {count} {text!r}")
            time.sleep(0.02)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()
        # the agent's systemd-format cache key (filled by test queriers) goes with it
        from keyhandoff.cache import SystemdCache  # noqa: PLC0415

        SystemdCache(keyname=self.keyname).clear()


def ask(
    *args: str, timeout: int = 5, keyname: str | None = None,
    message: str = "keyhandoff test prompt",
) -> subprocess.Popen[bytes]:
    """Start the real systemd-ask-password as a querier (``args`` are its options).

    The one way tests start a querier; end it with :func:`finish` or, where its files in
    the shared ask directory must go too, SIGTERM (it then removes them itself).
    """
    exe = require_binary("systemd-ask-password", INSTALL_SYSTEMD)
    key = [f"--keyname={keyname}"] if keyname else []
    return subprocess.Popen(
        [exe, "--no-tty", f"--timeout={timeout}", *key, *args, message],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def stop_querier(proc: subprocess.Popen[bytes]) -> None:
    """End a querier this test started, by its own PID, without leaving its files behind.

    SIGTERM, not SIGKILL: systemd-ask-password catches it (signalfd) and unlinks its ask
    file and socket; a SIGKILLed querier leaves both in the shared directory for every
    other agent to trip over.
    """
    from keyhandoff.askpass import HostileAskFile, list_ask_files, read_ask_file  # noqa: PLC0415

    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
    for name in list_ask_files(ASK_DIR):
        with contextlib.suppress(FileNotFoundError, HostileAskFile):
            request = read_ask_file(ASK_DIR, name)
            if request.pid == proc.pid:  # ours, and its owner is gone: clean up for it
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(request.socket)
                os.unlink(ASK_DIR / name)


@pytest.fixture
def querier() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start(id_=None, message=..., timeout=5, extra=())``: a real querier (:func:`ask`)
    with ``--id=id_`` and the options ``extra``; each one is ended by :func:`stop_querier`
    after the test."""
    require_binary("systemd-ask-password", INSTALL_SYSTEMD)
    # systemd-ask-password hardcodes this directory; without systemd as PID 1 nobody
    # made it.  Created if missing, never removed: other tests may be using it.
    ASK_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []

    def start(
        id_: str | None = None,
        message: str = "keyhandoff test prompt",
        timeout: int = 5,
        extra: tuple[str, ...] = (),
    ) -> subprocess.Popen[bytes]:
        ids = (f"--id={id_}",) if id_ is not None else ()
        proc = ask(*extra, *ids, timeout=timeout, message=message)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        stop_querier(proc)


def finish(q: subprocess.Popen[bytes], timeout: float = 20) -> tuple[int, bytes]:
    try:
        out, _ = q.communicate(timeout=timeout)
    finally:
        if q.poll() is None:
            q.kill()
            q.wait()
    return q.returncode, out


def ask_file_of(q: subprocess.Popen[bytes], timeout: float = 10) -> Path:
    """The ask file the querier with this PID wrote."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in ASK_DIR.glob("ask.*"):
            try:
                if f"PID={q.pid}\n" in p.read_text():
                    return p
            except FileNotFoundError:
                continue
        time.sleep(0.01)
    pytest.fail("the querier wrote no ask file")


def type_answer(ask_file: Path, passphrase: bytes) -> None:
    """Stand in for the person: answer through the real systemd-reply-password."""
    reply = "/lib/systemd/systemd-reply-password"
    socket_path = next(line.split("=", 1)[1] for line in ask_file.read_text().splitlines()
                       if line.startswith("Socket="))
    subprocess.run([reply, "1", socket_path], input=passphrase + b"\n", timeout=10, check=True)


def ask_files_of(pid: int, ask_dir: Path = ASK_DIR) -> list[Path]:
    """The ask files querier ``pid`` has in ``ask_dir`` now."""
    found = []
    for p in ask_dir.glob("ask.*"):
        try:
            if f"PID={pid}\n" in p.read_text():
                found.append(p)
        except FileNotFoundError:
            continue
    return found


class HandQuerier:
    """A querier written by the test in a private ask directory (the agent's ask_dir).

    For the one protocol case the real queriers cannot produce: systemd-cryptsetup asks
    again (same PID, AcceptCached=0) only after a passphrase that did not open the volume,
    so a retry after a *right* answer (activation failing for another reason) needs a
    querier of our own.  It writes ask files as systemd does (into place by rename) and
    records what reaches its root-owned socket.
    """

    def __init__(self, ask_dir: Path) -> None:
        import socket as _socket  # noqa: PLC0415

        self.dir = ask_dir
        self.dir.mkdir(mode=0o755, exist_ok=True)
        self.socket_path = self.dir / f"sck.{uuid.uuid4().hex[:16]}"
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self.sock.bind(str(self.socket_path))
        self.sock.settimeout(0)
        self.count = 0

    def prompt(self, source: Path, *, accept_cached: bool, pid: int | None = None) -> Path:
        self.count += 1
        name = f"ask.hand{self.count:02d}"
        tmp = self.dir / f"tmp.hand{self.count:02d}"
        tmp.write_text(
            f"[Ask]\nPID={pid or os.getpid()}\nSocket={self.socket_path}\n"
            f"AcceptCached={int(accept_cached)}\nEcho=0\nNotAfter=0\nSilent=0\n"
            f"Message=Please enter passphrase for disk test:\nIcon=drive-harddisk\n"
            f"Id=cryptsetup:{source}\n",
        )
        tmp.rename(self.dir / name)
        return self.dir / name

    def received(self, timeout: float = 0) -> list[bytes]:
        got = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                got.append(self.sock.recv(65536))
            except BlockingIOError:
                if got or time.monotonic() >= deadline:
                    return got
                time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()
