"""Helpers for the demo's guest jobs (shipped next to each job's script)."""

import contextlib
import hashlib
import json
import os
import subprocess
import time

from keyhandoff import onetime
from keyhandoff.luks import LuksHeader

DATA = "/data"


def result(name: str, ok: bool, detail: str = "") -> bool:
    subprocess.run(["vmtest-result", name, "PASS" if ok else "FAIL", detail or "-"], check=False)
    return ok


def wait_until(predicate, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def active(unit: str) -> bool:
    return subprocess.run(["systemctl", "is-active", "-q", unit], check=False).returncode == 0


def mounted(path: str = DATA) -> bool:
    return subprocess.run(["mountpoint", "-q", path], check=False).returncode == 0


def expected_sha() -> str:
    with open(os.path.join(os.environ["VMTEST_JOB"], "expect.sha256"), encoding="ascii") as f:
        return f.read().strip()


def token_sha(service: str) -> str | None:
    """Run the PAM stack ``service`` with pamtester; the SHA-256 of PAM_AUTHTOK, or None."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/run/kh-token")
    subprocess.run(["pamtester", service, "root", "authenticate"], stdin=subprocess.DEVNULL,
                   capture_output=True, check=False, timeout=60)
    try:
        with open("/run/kh-token", encoding="ascii") as f:
            value = f.read().strip()
    except FileNotFoundError:
        return None
    empty = hashlib.sha256(b"").hexdigest()
    return None if value == empty else value


def cached_volumes() -> list[str]:
    out = subprocess.run(["keyhandoff", "cache", "list", "--json"], capture_output=True,
                         text=True, check=False).stdout
    try:
        return [e["volume"] for e in json.loads(out)]
    except ValueError:
        return []


def onetime_tokens(device: str) -> int:
    with LuksHeader.open(device) as header:
        return len(onetime.slots(header))


def journal(message_id: str) -> list[dict]:
    out = subprocess.run(["journalctl", "-b", "-o", "json", f"MESSAGE_ID={message_id}"],
                         capture_output=True, text=True, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def journal_leaks(marker: bytes = b"khTESTpw-") -> int:
    """How often a test passphrase's marker occurs anywhere in this boot's journal."""
    out = subprocess.run(["journalctl", "-b", "-o", "export"], capture_output=True,
                         check=False).stdout
    return out.count(marker)
