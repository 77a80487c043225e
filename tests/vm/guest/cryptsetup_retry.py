#!/usr/bin/python3
"""Guest job of tests/vm/test_cryptsetup_retry.py: systemd-cryptsetup's retries, for real.

Runs as root in ``vmtest.service`` (``KeyringMode=shared``: root's ``@u`` is
linked into the job's session keyring, so the job, systemd-cryptsetup and the agent all
possess it), on a kernel with device-mapper and dm-crypt, which the test host lacks:
systemd-cryptsetup asks again only after libcryptsetup refused a passphrase while
activating, and activating needs device-mapper.

1. ``cs-*``: the real systemd-cryptsetup (257) attaching a LUKS2 image file; its first ask
   file says ``AcceptCached=1``; after a wrong reply its retry comes from the same PID with
   ``AcceptCached=0`` and the same ``Id=``.
2. ``agent-*``: keyhandoff's agent (``python3 -m keyhandoff agent``) holding a WRONG cached
   passphrase for the volume answers systemd-cryptsetup's first prompt once, never its
   retry, and drops the entry only after its verifier child found that it does not open the
   volume (RETRY before DROPPED in its log); then the retry is cancelled as a person would.

Each fact is one ``vmtest-result`` line; a failed fact ends its part.  Passphrases come from
the checkout's tests/passphrases.py ``make()`` (generated here, never on the job disk) and are
never printed: the host scans the serial console for their marker.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, "/opt/keyhandoff-src/tests")
from passphrases import MARKER, make  # the project's test passphrases (the leak-scan marker)

from keyhandoff import askpass, reply
from keyhandoff.askpass import ASK_DIR, AskRequest, HostileAskFile
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.errors import KeyUnavailable
from keyhandoff.secret import Secret

SYSTEMD_CRYPTSETUP = "/usr/lib/systemd/systemd-cryptsetup"
WAIT = 60.0  # seconds for any one event; TCG is slow, a hang still ends
POLL = 0.02  # how often a bounded wait looks again (ask files and the agent log are files)
ATTACH_TIMEOUT = 120  # systemd-cryptsetup's own bound over all its tries


class FactFailed(Exception):
    """A reported FAIL: the rest of that part would rest on a false premise."""


def result(name: str, ok: bool, detail: str = "-") -> bool:
    subprocess.run(["vmtest-result", name, "PASS" if ok else "FAIL", detail], check=False)
    return ok


def expect(name: str, ok: bool, detail: str = "-") -> None:
    if not result(name, ok, detail):
        raise FactFailed(name)


def wait_until(what: str, predicate, timeout: float = WAIT):
    """``predicate()``'s first truthy value, polled until ``timeout``; FactFailed after it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FactFailed(f"no {what} within {timeout:.0f} s")
        time.sleep(POLL)


# --- LUKS2 images and the real querier ---------------------------------------------------


def format_image(path: Path, passphrase: bytes) -> Path:
    """A 20 MiB LUKS2 image file (fast PBKDF2: TCG), the passphrase on stdin only."""
    with path.open("wb") as f:
        f.truncate(20 << 20)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", "--batch-mode", "--key-file=-", str(path)],
        input=passphrase, capture_output=True, check=True, timeout=120,
    )
    return path


def luks_uuid(path: Path) -> str:
    return subprocess.run(["cryptsetup", "luksUUID", str(path)], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def attach(image: Path, name: str) -> subprocess.Popen[bytes]:
    """The real systemd-cryptsetup asking for ``image``'s passphrase, as at boot."""
    return subprocess.Popen(
        [SYSTEMD_CRYPTSETUP, "attach", name, str(image), "none",
         f"luks,timeout={ATTACH_TIMEOUT}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def ask_files_of(pid: int) -> list[tuple[str, AskRequest]]:
    """The ask files querier ``pid`` has in the ask directory now, parsed by keyhandoff."""
    found = []
    for name in askpass.list_ask_files(ASK_DIR):
        with contextlib.suppress(FileNotFoundError, HostileAskFile):
            request = askpass.read_ask_file(ASK_DIR, name)
            if request.pid == pid:
                found.append((name, request))
    return found


def wait_for_ask_file(pid: int, *, other_than: str | None = None) -> tuple[str, AskRequest]:
    """The (first) ask file of querier ``pid`` not named ``other_than``."""
    def look() -> tuple[str, AskRequest] | None:
        return next(((n, r) for n, r in ask_files_of(pid) if n != other_than), None)
    return wait_until(f"ask file of PID {pid} other than {other_than}", look)


def retry_ask_file(pid: int) -> tuple[str, AskRequest]:
    """The ask file of querier ``pid`` that does not accept cached passwords (a retry)."""
    def look() -> tuple[str, AskRequest] | None:
        return next(((n, r) for n, r in ask_files_of(pid) if not r.accept_cached), None)
    return wait_until(f"AcceptCached=0 ask file of PID {pid}", look)


def cancel(proc: subprocess.Popen[bytes], name: str, request: AskRequest, fact: str) -> bytes:
    """Cancel the prompt as a person would; the querier must fail and take its file away."""
    reply.send_reply(ASK_DIR, name, request, reply.cancel_datagram())
    _out, err = proc.communicate(timeout=WAIT)
    gone = name not in list(askpass.list_ask_files(ASK_DIR))
    expect(fact, proc.returncode != 0 and gone,
           f"systemd-cryptsetup rc={proc.returncode} after the cancel, ask file gone={gone}")
    return err


def stop(proc: subprocess.Popen[bytes]) -> bytes:
    """End systemd-cryptsetup by PID if it still runs; what it wrote to stderr."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate(timeout=20)[1]
    return b""


def unpush(*passphrases: bytes) -> None:
    """systemd-cryptsetup pushed what it received into root's ``cryptsetup`` key: remove it."""
    pushed = [Secret(p) for p in passphrases]
    try:
        SystemdCache().remove(pushed)
    finally:
        for p in pushed:
            p.wipe()


def show(tag: str, label: str, text: bytes) -> None:
    """Diagnostics on the console, only when they hold no test passphrase."""
    if MARKER in text:
        result("no-leak-" + tag, ok=False, detail="a test passphrase is in " + label)
        return
    print(f"--- {label} ---\n{text.decode(errors='replace').strip()}", flush=True)


# --- keyhandoff's agent ------------------------------------------------------------------


class Agent:
    """``python3 -m keyhandoff agent`` with its own config; its log (stderr) to a file."""

    def __init__(self, workdir: Path) -> None:
        # retain = 0: nothing is captured, so the cached entry is the only one in play
        self.config = workdir / "keyhandoff.conf"
        self.config.write_text(
            "[capture]\nretain = 0\n[agent]\n"
            f'systemd_keyname = "kh-vm-test-cryptsetup-{uuid.uuid4().hex[:12]}"\n',
        )
        self.log = workdir / "agent.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keyhandoff", "agent", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "KEYHANDOFF_LOG": "stderr"},
            )
        self.wait_for_log("keyhandoff: STARTED")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, line: str) -> str:
        def look() -> str | None:
            content = self.text()
            if line in content:
                return content
            if self.proc.poll() is not None:
                raise FactFailed(f"agent exited {self.proc.returncode} before {line!r}")
            return None
        return wait_until(f"{line!r} in the agent's log", look)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM, by its PID
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        return self.proc.returncode


# --- the two parts ------------------------------------------------------------------------


def part_retries_do_not_accept_cached(workdir: Path) -> None:
    # The protocol the agent follows (src/cryptsetup/cryptsetup.c: get_password(...,
    # tries == 0 && !arg_verify, ...)): the first prompt says AcceptCached=1, the prompt
    # after a passphrase that did not open the volume says 0, from the same PID.
    image = format_image(workdir / "retry.img", make("right"))
    wrong = make("wrong")
    proc = attach(image, f"khrt{uuid.uuid4().hex[:6]}")
    err = b""
    try:
        first, request = wait_for_ask_file(proc.pid)
        expect("cs-first-accepts-cached", request.accept_cached is True,
               f"AcceptCached={int(request.accept_cached)} Id={request.id}")
        with Secret.passphrase(wrong) as secret, reply.reply_datagram(secret) as datagram:
            reply.send_reply(ASK_DIR, first, request, datagram)
        replied = time.monotonic()
        retry, again = wait_for_ask_file(proc.pid, other_than=first)
        took = time.monotonic() - replied
        expect("cs-retry-same-pid", again.pid == proc.pid == request.pid,
               f"PID {again.pid}; a new ask file {retry} {took:.1f} s after the wrong reply")
        expect("cs-retry-no-accept-cached", again.accept_cached is False,
               f"AcceptCached={int(again.accept_cached)}")
        expect("cs-retry-same-id", again.id == request.id, f"Id={again.id}")
        err = cancel(proc, retry, again, "cs-retry-cancelled")
    finally:
        err += stop(proc)
        unpush(wrong)
        show("cs-stderr-1", "systemd-cryptsetup (part 1) stderr", err)


def part_agent_answers_once(workdir: Path) -> None:
    # Finding 10, the rule kept: the real systemd-cryptsetup gets our (wrong) cached
    # passphrase once; its retry (same PID, AcceptCached=0) is never answered, and the
    # entry is dropped once the check in the verifier child says it does not open the volume.
    left = SystemdCache().read()
    for e in left:
        e.wipe()
    # systemd-cryptsetup reads root's "cryptsetup" key before asking: it must be empty, or
    # its first try would not reach the agent at all.
    expect("systemd-cache-empty", not left, f"{len(left)} entry(ies) in root's cryptsetup key")
    image = format_image(workdir / "agent.img", make("vol"))
    vid = luks_uuid(image)
    stale = make("stale")
    cache = PassphraseCache()
    with Secret.passphrase(stale) as secret:
        cache.put(vid, secret, timeout=300)  # cached, but wrong
    agent = Agent(workdir)
    err = b""
    try:
        proc = attach(image, f"khretry{uuid.uuid4().hex[:6]}")
        try:
            # its first try (AcceptCached=1, part 1 shows it) is answered at once, too
            # fast to watch; its retry waits for the person
            log = agent.wait_for_log("keyhandoff: ANSWERED")
            answered = [line for line in log.splitlines() if "keyhandoff: ANSWERED" in line]
            result("agent-answered-first", ok=True, detail=answered[0])
            retry, request = retry_ask_file(proc.pid)
            expect("agent-retry-no-accept-cached", request.accept_cached is False,
                   f"ask file {retry} of PID {request.pid}: AcceptCached=0")
            agent.wait_for_log("keyhandoff: DROPPED")
            log = agent.text()
            retry_at, dropped_at = log.find("keyhandoff: RETRY"), log.find("keyhandoff: DROPPED")
            expect("agent-retry-before-dropped", 0 <= retry_at < dropped_at,
                   "RETRY, then DROPPED after the verifier's check" if retry_at >= 0
                   else "DROPPED without a RETRY line (no check in the verifier child)")
            try:
                cache.get(vid).wipe()
            # Not only KeyNotFound: cache.get() raises KeyExpired for an entry whose timeout
            # passed, and KeyRevoked when the agent invalidates the key between the lookup
            # and the read. Each means "no usable entry" (what this check is about), so catch
            # their common base; other errors (permissions, the keyring itself) still fail.
            except KeyUnavailable:
                gone = True
            else:
                gone = False
            expect("agent-entry-dropped", gone and vid not in [e.volume for e in cache.entries()],
                   f"keyhandoff's cache has no entry for {vid}")
            # the retry is still waiting for the person: cancel it as the person would
            err = cancel(proc, retry, request, "agent-retry-cancelled")
        finally:
            err += stop(proc)
            unpush(stale)
            show("cs-stderr-2", "systemd-cryptsetup (part 2) stderr", err)
    finally:
        rc = agent.stop()
        cache.forget(vid)
        show("agent-log", f"agent log (rc={rc})", agent.text().encode())
    log = agent.text()  # complete: the agent has stopped
    count = log.count("keyhandoff: ANSWERED")
    expect("agent-answered-once", count == 1, f"{count} ANSWERED line(s) in the agent's log")


def no_leak(workdir: Path) -> None:
    journal = subprocess.run(["journalctl", "-b", "-o", "export"], capture_output=True,
                             check=False, timeout=60).stdout
    files = [p for p in workdir.iterdir() if p.suffix != ".img" and MARKER in p.read_bytes()]
    result("no-leak", MARKER not in journal and not files,
           f"marker in this boot's journal: {journal.count(MARKER)}, in job files: "
           f"{[p.name for p in files]}")


def main() -> int:
    loaded = subprocess.run(["modprobe", "-a", "loop", "dm_mod", "dm_crypt"],
                            capture_output=True, text=True, check=False, timeout=60)
    with open("/proc/misc", encoding="ascii") as f:
        dm = "device-mapper" in f.read()
    ok = result("kernel-parts", loaded.returncode == 0 and dm,
                f"modprobe rc={loaded.returncode}; device-mapper in /proc/misc: {dm}; "
                + subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split("\n", 1)[0])
    workdir = Path(tempfile.mkdtemp(prefix="kh-retry-", dir="/var/tmp"))
    failed = not ok
    for part in (part_retries_do_not_accept_cached, part_agent_answers_once):
        try:
            part(workdir)
        except FactFailed as exc:
            print(f"{part.__name__}: stopped at {exc}", flush=True)
            failed = True
        except Exception as exc:  # noqa: BLE001  # reported, never a silent pass
            result(part.__name__, ok=False, detail=f"aborted: {type(exc).__name__}: {exc}")
            failed = True
    no_leak(workdir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
