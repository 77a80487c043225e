"""Run the real agent (``python -m keyhandoff agent``) and real queriers for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import require_binary

ASK_DIR = Path("/run/systemd/ask-password")
INSTALL_SYSTEMD = "apt-get install systemd"


class AgentProcess:
    """The agent as a child process with its own config; stderr collected for scans."""

    def __init__(self, tmp_path: Path, *, retain: int = 60) -> None:
        self.keyname = f"kh-test-cryptsetup-{uuid.uuid4().hex[:12]}"
        self.config = tmp_path / "keyhandoff.conf"
        self.config.write_text(
            f'[capture]\nretain = {retain}\n[agent]\nsystemd_keyname = "{self.keyname}"\n',
        )
        self.log = tmp_path / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AgentProcess:
        ASK_DIR.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KEYHANDOFF_LOG": "stderr"}
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
) -> subprocess.Popen[bytes]:
    """Start the real systemd-ask-password as a querier (message last)."""
    exe = require_binary("systemd-ask-password", INSTALL_SYSTEMD)
    key = [f"--keyname={keyname}"] if keyname else []
    return subprocess.Popen(
        [exe, "--no-tty", f"--timeout={timeout}", *key, *args, "keyhandoff test prompt"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


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
