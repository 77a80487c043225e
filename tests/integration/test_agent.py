"""The agent against the real systemd-ask-password, real LUKS2 headers, the real keyring."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from support.agent_process import (
    AgentProcess,
    HandQuerier,
    ask,
    ask_file_of,
    finish,
    type_answer,
)
from support.luks_headers import set_header_uuid
from support.luks_images import add_key, format_image, uuid_of
from support.parts import require, require_binary
from support.passphrases import MARKER, make

from keyhandoff import verifier
from keyhandoff.cache import SystemdCache
from keyhandoff.errors import KeyNotFound
from keyhandoff.secret import Secret


@pytest.fixture
def volume(image, person):
    """:func:`support.luks_images.image` with its UUID and passphrase: (path, uuid, pw)."""
    return image, uuid_of(image), person


@contextlib.contextmanager
def by_uuid_link(image: Path, vid: str):
    """``/dev/disk/by-uuid/<vid>`` -> a loop device holding ``image``, as udev makes it.

    This machine has no udevd; the link is made by hand, and removed with whatever
    directories this made.
    """
    losetup = require_binary("losetup", "apt-get install mount")
    require(Path("/dev/loop-control").exists(), "loop devices",
            "run on a kernel with CONFIG_BLK_DEV_LOOP")
    node = subprocess.run([losetup, "--find", "--show", "--read-only", str(image)],
                          capture_output=True, check=True, text=True).stdout.strip()
    made = [d for d in (Path("/dev/disk"), Path("/dev/disk/by-uuid")) if not d.exists()]
    link = Path("/dev/disk/by-uuid") / vid
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../../{Path(node).name}")
        yield link
    finally:
        link.unlink(missing_ok=True)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        subprocess.run([losetup, "--detach", node], check=False)


def test_answers_from_cache_by_image_path(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path) as agent:
        # --accept-cached: AcceptCached=1, as systemd-cryptsetup's first try for a volume
        rc, out = finish(ask(f"--id=cryptsetup:{img}", "--accept-cached"))
        assert (rc, out) == (0, pw + b"\n")
        agent.wait_for_log("ANSWERED")


def test_answers_by_uuid_path(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    # the link udev would make: /dev/disk/by-uuid/<vid> -> the loop device holding the image
    with by_uuid_link(img, vid) as link, AgentProcess(tmp_path):
        rc, out = finish(ask(f"--id=cryptsetup:{link}", "--accept-cached"))
        assert (rc, out) == (0, pw + b"\n")


@pytest.mark.parametrize("case", ["wrong-volume", "no-entry", "expired", "verification", "pin"])
def test_no_answer(tmp_path, cache, volume, case):
    img, vid, pw = volume
    other = format_image(tmp_path / "other.img", make("other"))
    ident = f"--id=cryptsetup:{img}"
    if case == "wrong-volume":
        cache.put(vid, Secret.passphrase(pw), timeout=60)
        ident = f"--id=cryptsetup:{other}"
    elif case == "expired":
        cache.put(vid, Secret.passphrase(pw), timeout=1)
        time.sleep(1.5)
    elif case == "verification":
        cache.put(vid, Secret.passphrase(pw), timeout=60)
        ident = f"--id=cryptsetup-verification:{img}"
    elif case == "pin":
        cache.put(vid, Secret.passphrase(pw), timeout=60)
        ident = ""
    with AgentProcess(tmp_path) as agent:
        # AcceptCached=1: answerable but for the reason each case tests
        rc, out = finish(ask(*([ident] if ident else []), "--accept-cached", timeout=2))
        assert rc != 0
        assert out == b""
        assert "ANSWERED" not in agent.log.read_text()


def test_captures_what_the_person_typed_wrong_then_right(tmp_path, cache, volume):
    img, vid, pw = volume
    wrong = make("typo")
    with AgentProcess(tmp_path, retain=45) as agent:
        for typed in (wrong, pw):
            q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
            type_answer(ask_file_of(q), typed)
            assert finish(q) == (0, typed + b"\n")
            agent.wait_for_log("keyhandoff: CAPTURED" if typed == pw
                               else "keyhandoff: NOT_CAPTURED")
        with cache.get(vid) as got:
            assert bytes(got.view()) == pw
        [entry] = [e for e in cache.entries() if e.volume == vid]
        assert entry.seconds_left is not None
        assert 30 <= entry.seconds_left <= 45
        # and the next prompt for that volume is answered from what was captured
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")


def _proc_keys_expiry(serial: int) -> str:
    """The expiry column of /proc/keys for ``serial``, as the kernel prints it (``89m``)."""
    for line in Path("/proc/keys").read_text().splitlines():
        fields = line.split()
        if int(fields[0], 16) == serial:
            return fields[3]
    raise AssertionError(f"key {serial} is not in /proc/keys")


@pytest.mark.parametrize(("retain", "wait", "expiry"), [
    (45, '"50min"', {"48m", "49m", "50m"}),  # automatic arming: it may wait for an update
    (45, None, {"43s", "44s", "45s"}),  # no automatic arming: retain alone
])
def test_capture_timeout_is_the_retention_policy(tmp_path, cache, volume, retain, wait,
                                                 expiry):
    img, vid, pw = volume
    with AgentProcess(tmp_path, retain=retain, wait_for_update=wait) as agent:
        q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
        type_answer(ask_file_of(q), pw)
        assert finish(q) == (0, pw + b"\n")
        agent.wait_for_log("keyhandoff: CAPTURED")
    [entry] = [e for e in cache.entries() if e.volume == vid]
    # the kernel's own timeout, as /proc/keys shows it (whole minutes below an hour)
    assert _proc_keys_expiry(entry.serial) in expiry


# --- one-time keys: answered from first, never captured as the passphrase ----------------


@pytest.fixture
def onetime_volume(volume):
    """A volume with its passphrase and a second keyslot standing in for a one-time keyslot."""
    img, vid, pw = volume
    otk = make("onetime")
    add_key(img, pw, otk)
    return img, vid, pw, otk


def test_answers_from_the_one_time_key_before_the_passphrase(tmp_path, cache, onetime_volume):
    img, vid, pw, otk = onetime_volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    cache.put_onetime(vid, Secret.passphrase(otk), timeout=60)
    with AgentProcess(tmp_path) as agent:
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, otk + b"\n")
        agent.wait_for_log("keyhandoff: ANSWERED")
        # both keys stay where they were: finish forgets the one-time key, not the agent
        with cache.get(vid) as kept, cache.get_onetime(vid) as onetime:
            assert (bytes(kept.view()), bytes(onetime.view())) == (pw, otk)
        # without a one-time key the same prompt is answered from the passphrase
        assert cache.forget_onetime(vid)
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")


def test_a_one_time_key_is_never_captured_as_the_passphrase(tmp_path, cache, onetime_volume):
    # A prompt left to the person (AcceptCached=0) is open while the agent answers another
    # querier of the same volume from its one-time key; that querier pushes the one-time key
    # into systemd's cache, the newest entry when the first prompt goes away.  It opens the
    # volume, and is still not kept as the volume's passphrase.
    img, vid, pw, otk = onetime_volume
    cache.put_onetime(vid, Secret.passphrase(otk), timeout=60)
    with AgentProcess(tmp_path, retain=45) as agent:
        left = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=30)
        try:
            ask_file_of(left)
            agent.wait_for_log("left to the person")
            answered = ask(f"--id=cryptsetup:{img}", "--accept-cached", keyname=agent.keyname)
            assert finish(answered) == (0, otk + b"\n")
            entries = SystemdCache(keyname=agent.keyname).read()
            try:  # what the prompt left to the person would capture
                assert [bytes(e.view()) for e in entries] == [otk]
            finally:
                for e in entries:
                    e.wipe()
        finally:
            left.terminate()  # the person gives up: its ask file goes
            finish(left)
        agent.wait_for_log("is its one-time key; not kept as its passphrase")
        with pytest.raises(KeyNotFound):
            cache.get(vid)
        assert cache.entries() == []
        # the control: what the person types for the next prompt is captured
        q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
        type_answer(ask_file_of(q), pw)
        assert finish(q) == (0, pw + b"\n")
        agent.wait_for_log("keyhandoff: CAPTURED")
        with cache.get(vid) as got:
            assert bytes(got.view()) == pw
    assert "keyhandoff: CAPTURED" in agent.log.read_text()
    assert agent.log.read_text().count("keyhandoff: CAPTURED") == 1


def test_retry_after_a_one_time_answer_drops_the_one_time_key_only(tmp_path, cache,
                                                                    onetime_volume):
    img, vid, pw, _otk = onetime_volume
    wrong = make("wrong-onetime")
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    cache.put_onetime(vid, Secret.passphrase(wrong), timeout=60)
    querier = HandQuerier(tmp_path / "ask")
    try:
        with AgentProcess(tmp_path, retain=0, ask_dir=querier.dir) as agent:
            first = querier.prompt(img, accept_cached=True)
            assert querier.received(timeout=10) == [b"+" + wrong]
            first.unlink()
            querier.prompt(img, accept_cached=False)  # same PID: a retry
            agent.wait_for_log("keyhandoff: DROPPED")
            assert querier.received() == []
            assert "rejected our one-time key" in agent.log.read_text()
            with pytest.raises(KeyNotFound):
                cache.get_onetime(vid)
            with cache.get(vid) as kept:  # the passphrase was not what was judged
                assert bytes(kept.view()) == pw
            # a new querier is answered from the passphrase now
            querier.prompt(img, accept_cached=True, pid=os.getppid())
            assert querier.received(timeout=5) == [b"+" + pw]
    finally:
        querier.close()


# The retry of the real systemd-cryptsetup needs device-mapper: tests/vm/test_cryptsetup_retry.py


def test_independent_prompt_without_accept_cached_keeps_a_right_entry(tmp_path, cache, volume):
    # Finding 10: two independent queriers for one volume; the second does not accept
    # cached passwords (it is nobody's retry of our answer): not answered, entry kept.
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path, retain=0) as agent:
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
        assert finish(ask(f"--id=cryptsetup:{img}", timeout=2)) == (1, b"")
        with cache.get(vid) as kept:
            assert bytes(kept.view()) == pw
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
        agent.wait_for_count("keyhandoff: ANSWERED", 2)  # the log line follows the answer
    log = agent.log.read_text()  # complete: the agent has stopped
    assert "DROPPED" not in log
    assert log.count("keyhandoff: ANSWERED") == 2


@pytest.mark.parametrize("right", [True, False], ids=["right-entry", "wrong-entry"])
def test_retry_after_our_answer_checks_the_entry_before_dropping(tmp_path, cache, volume, right):
    # Finding 10: the same querier asks again after our answer.  A right entry (activation
    # failed for another reason) is kept; a wrong one is dropped, after the check.  The
    # querier is the test's own (HandQuerier says why); everything else is real.
    img, vid, pw = volume
    cached = pw if right else make("wrong")
    cache.put(vid, Secret.passphrase(cached), timeout=60)
    querier = HandQuerier(tmp_path / "ask")
    try:
        with AgentProcess(tmp_path, retain=0, ask_dir=querier.dir) as agent:
            first = querier.prompt(img, accept_cached=True)
            assert querier.received(timeout=10) == [b"+" + cached]
            first.unlink()  # the querier read the answer and removes its prompt
            querier.prompt(img, accept_cached=False)  # same PID: a retry
            agent.wait_for_log("keyhandoff: KEPT" if right else "keyhandoff: DROPPED")
            assert querier.received() == []  # never a second answer
            log = agent.log.read_text()
            assert "keyhandoff: RETRY" in log
            if right:
                assert "DROPPED" not in log
                with cache.get(vid) as kept:
                    assert bytes(kept.view()) == pw
            else:
                assert log.index("keyhandoff: RETRY") < log.index("keyhandoff: DROPPED")
                with pytest.raises(KeyNotFound):
                    cache.get(vid)
            # a new querier's first try (AcceptCached=1) is answered from a kept entry
            # (another PID is what makes it another querier: the test's parent, alive)
            querier.prompt(img, accept_cached=True, pid=os.getppid())
            assert querier.received(timeout=5 if right else 1) == (
                [b"+" + pw] if right else [])
            # ... and the querier we answered never gets a second answer, even if it
            # claims to accept cached passwords again
            querier.prompt(img, accept_cached=True)
            assert querier.received(timeout=1) == []
    finally:
        querier.close()


def test_64_simultaneous_prompts(tmp_path, cache):
    images = []
    for i in range(64):
        pw = make(f"m{i}")
        img = format_image(tmp_path / f"d{i}.img", pw)
        cache.put(uuid_of(img), Secret.passphrase(pw), timeout=120)
        images.append((img, pw))
    with AgentProcess(tmp_path) as agent:
        queriers = [(ask(f"--id=cryptsetup:{img}", "--accept-cached", timeout=20), pw)
                    for img, pw in images]
        for q, pw in queriers:
            assert finish(q, timeout=30) == (0, pw + b"\n")
        agent.wait_for_count("keyhandoff: ANSWERED", 64)
        assert agent.log.read_text().count("keyhandoff: ANSWERED") == 64


def test_same_passphrase_on_two_volumes_each_get_an_answer(tmp_path, cache):
    pw = make("shared")
    a = format_image(tmp_path / "a.img", pw)
    b = format_image(tmp_path / "b.img", pw)
    for img in (a, b):
        cache.put(uuid_of(img), Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path):
        for img in (a, b):
            assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")


def test_tty_agent_lists_the_prompts_the_agent_sees(tmp_path, volume):
    img, _vid, _pw = volume
    tty_agent = require_binary("systemd-tty-ask-password-agent", "apt-get install systemd")
    with AgentProcess(tmp_path):
        q = ask(f"--id=cryptsetup:{img}", timeout=5)
        try:
            ask_file_of(q)
            listed = subprocess.run([tty_agent, "--list"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout
            assert "keyhandoff test prompt" in listed
            from keyhandoff import askpass  # noqa: PLC0415

            names = list(askpass.list_ask_files())
            assert len(names) >= 1
        finally:
            finish(q)


def test_stops_cleanly_on_sigterm(tmp_path):
    with AgentProcess(tmp_path) as agent:
        assert agent.stop() == 0
        assert "STOPPING" in agent.log.read_text()


def test_unknown_volume_uuid_in_by_uuid_path_is_ignored(tmp_path, cache):
    with AgentProcess(tmp_path, retain=0) as agent:
        rc, _ = finish(ask(f"--id=cryptsetup:/dev/disk/by-uuid/{uuid.uuid4()}",
                           "--accept-cached", timeout=2))
        assert rc != 0
        assert "ANSWERED" not in agent.log.read_text()


HARDEN_THEN_SLEEP = (
    "import sys, time\n"
    "from keyhandoff import process\n"
    "if sys.argv[1] == 'harden':\n"
    "    process.harden(lock_memory=False)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def _proc_owner_after(mode: str) -> int:
    """uid owning /proc/<pid>/environ of a uid-65534 process that did (or not) harden().

    The kernel gives a non-dumpable process's /proc files to root: a reading that only
    PR_SET_DUMPABLE changes (ptrace is refused to everyone in this sandbox, so it cannot
    tell the two apart).
    """
    child = subprocess.Popen(
        # CAP_DAC_READ_SEARCH (ambient) only lets it import us from a checkout in a 0700
        # directory; the "plain" control shows it leaves the process dumpable.
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
         sys.executable, "-c", HARDEN_THEN_SLEEP, mode],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        return os.stat(f"/proc/{child.pid}/environ").st_uid
    finally:
        child.kill()
        child.wait()


def test_harden_makes_the_process_non_dumpable():
    assert _proc_owner_after("plain") == 65534
    assert _proc_owner_after("harden") == 0


def test_agent_hardens_itself_and_locks_its_memory(tmp_path):
    with AgentProcess(tmp_path) as agent:
        assert agent.proc is not None
        assert "dumpable=0" in agent.log.read_text()  # the kernel's PR_GET_DUMPABLE answer
        status = Path(f"/proc/{agent.proc.pid}/status").read_text()
        locked = next(int(ln.split()[1]) for ln in status.splitlines()
                      if ln.startswith("VmLck:"))
        assert locked > 0


def test_no_passphrase_in_agent_output_cmdline_or_environ(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path, retain=30) as agent:
        assert agent.proc is not None
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
        # the person types for a second prompt: captured, verified, kept
        cache.forget(vid)
        q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
        type_answer(ask_file_of(q), pw)
        finish(q)
        agent.wait_for_log("keyhandoff: CAPTURED")
        pid = agent.proc.pid
        for name in ("cmdline", "environ"):
            assert pw not in Path(f"/proc/{pid}/{name}").read_bytes()
    assert pw not in agent.log.read_bytes()
    assert MARKER not in agent.log.read_bytes()


def test_sigkill_mid_service_leaves_the_person_a_normal_prompt(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    agent = AgentProcess(tmp_path)
    with agent:
        assert agent.proc is not None
        agent.proc.kill()  # SIGKILL: no clean-up of ours runs
        agent.proc.wait()
        # nobody answers now: the querier (the person's prompt) times out normally
        rc, out = finish(ask(f"--id=cryptsetup:{img}", "--accept-cached", timeout=2))
        assert (rc, out) == (1, b"")
    # state lives in the kernel, not in the dead process: a restarted agent serves at once
    with AgentProcess(tmp_path):
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")


def test_ask_file_whose_querier_died_is_refused(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    q = ask(f"--id=cryptsetup:{img}", "--accept-cached", timeout=30)
    ask_file = ask_file_of(q)
    socket_path = next(line.split("=", 1)[1] for line in ask_file.read_text().splitlines()
                       if line.startswith("Socket="))
    q.kill()  # the querier dies without removing its ask file and socket
    q.wait()
    try:
        with AgentProcess(tmp_path) as agent:
            agent.wait_for_log("REFUSED")
            assert "ANSWERED" not in agent.log.read_text()
            assert "not alive" in agent.log.read_text()  # refused for that reason
    finally:
        ask_file.unlink(missing_ok=True)
        Path(socket_path).unlink(missing_ok=True)


# --- finding 5: bad header data never ends the agent ---------------------------------------


@pytest.mark.parametrize("luks", ["luks1", "luks2"])
@pytest.mark.parametrize("raw", [b"NOT-A-UUID", b"\xff\xfe-not-ascii",
                                 b"{12345678-1234-1234-1234-123456789a}"],
                         ids=["non-canonical", "non-ascii", "braces"])
def test_bad_header_uuid_is_refused_and_later_prompts_are_answered(tmp_path, cache, volume,
                                                                   luks, raw):
    img, vid, pw = volume
    bad = format_image(tmp_path / "bad.img", make("bad"), luks=luks)
    set_header_uuid(bad, raw)  # LUKS2: checksums recomputed, libcryptsetup still loads it
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path) as agent:
        assert finish(ask(f"--id=cryptsetup:{bad}", "--accept-cached", timeout=2)) == (1, b"")
        agent.wait_for_log("malformed UUID")
        assert agent.proc is not None
        assert agent.proc.poll() is None  # still serving
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
        agent.wait_for_count("keyhandoff: ANSWERED", 1)
    assert agent.log.read_text().count("keyhandoff: ANSWERED") == 1


# --- finding 9: only the prompt's own device proves the volume -----------------------------


@pytest.mark.parametrize("shape", ["UUID=", "missing-by-uuid-link"])
def test_uuid_named_source_without_a_header_is_not_answered(tmp_path, cache, volume, shape):
    _img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    source = f"UUID={vid}" if shape == "UUID=" else f"/dev/disk/by-uuid/{vid}"
    assert not os.path.lexists(source)  # no udev here: the name is all there is
    with AgentProcess(tmp_path) as agent:
        assert finish(ask(f"--id=cryptsetup:{source}", "--accept-cached", timeout=2)) == (1, b"")
        agent.wait_for_log("keyhandoff: IGNORED")
        assert "ANSWERED" not in agent.log.read_text()


def test_by_uuid_link_to_another_volume_answers_for_the_header_not_the_name(tmp_path, cache,
                                                                            volume):
    # the link names volume A but holds volume B: B's passphrase (if any), never A's
    img, vid, pw = volume
    other = format_image(tmp_path / "other.img", make("other"))
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with by_uuid_link(other, vid) as link, AgentProcess(tmp_path) as agent:
        assert finish(ask(f"--id=cryptsetup:{link}", "--accept-cached", timeout=2)) == (1, b"")
        assert "ANSWERED" not in agent.log.read_text()
    assert img.exists()


# --- finding 15: a notify socket nobody reads ----------------------------------------------


def test_a_notify_socket_nobody_reads_never_stops_the_answers(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=120)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as stuck:
        stuck.bind(str(path))  # bound, never read: its queue fills after ~10 datagrams
        with AgentProcess(tmp_path, retain=0, env={"NOTIFY_SOCKET": str(path)}) as agent:
            for _ in range(30):  # each answer changes the status line
                assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached"),
                              timeout=20) == (0, pw + b"\n")
            agent.wait_for_log("keyhandoff: NOTIFY_DROPPED")
            assert agent.stop() == 0  # STOPPING=1 tried, never waited for
        stuck.settimeout(0)
        first = stuck.recv(4096)
    assert first.startswith(b"READY=1\nSTATUS=")


def test_notify_socket_gets_ready_status_and_stopping(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as reader:
        reader.bind(str(path))
        reader.settimeout(10)
        with AgentProcess(tmp_path, retain=0, env={"NOTIFY_SOCKET": str(path)}) as agent:
            assert reader.recv(4096).startswith(b"READY=1\n")
            assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
            lines = []
            while not any(b"answered 1," in m for m in lines):
                lines.append(reader.recv(4096))
            assert agent.stop() == 0
        while b"STOPPING=1" not in (last := reader.recv(4096)):
            pass
    assert last.startswith(b"STOPPING=1\nSTATUS=")


# --- finding 18: libcryptsetup stays out of the agent --------------------------------------


def test_answering_and_capturing_never_load_libcryptsetup(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path, retain=30) as agent:
        assert agent.proc is not None
        assert finish(ask(f"--id=cryptsetup:{img}", "--accept-cached")) == (0, pw + b"\n")
        cache.forget(vid)
        q = ask(f"--id=cryptsetup:{img}", keyname=agent.keyname, timeout=10)
        type_answer(ask_file_of(q), pw)
        finish(q)
        agent.wait_for_log("keyhandoff: CAPTURED")  # verified, by a child
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "libcryptsetup" not in maps
        assert "libcrypto" not in maps
        with cache.get(vid) as got:
            assert bytes(got.view()) == pw


# --- the verifier child ---------------------------------------------------------------------


def _verdict(path: Path, vid: str, candidate: bytes) -> verifier.Verdict:
    with Secret.passphrase(candidate) as secret:
        running = verifier.start(str(path), vid, secret)
    deadline = time.monotonic() + 30
    import select  # noqa: PLC0415

    while not select.select([running.fileno()], [], [], 0.1)[0]:
        assert time.monotonic() < deadline
    return running.result()


def test_verifier_child_verdicts(tmp_path, volume):
    img, vid, pw = volume
    other = format_image(tmp_path / "other.img", make("other"))
    assert _verdict(img, vid, pw) is verifier.Verdict.OPENS
    assert _verdict(img, vid, make("wrong")) is verifier.Verdict.REFUSED
    assert _verdict(other, vid, pw) is verifier.Verdict.OTHER_VOLUME
    assert _verdict(tmp_path / "absent.img", vid, pw) is verifier.Verdict.FAILED


def test_verifier_child_gets_the_passphrase_on_a_pipe_only(tmp_path, volume, monkeypatch):
    # A slow PBKDF keeps the child alive long enough to read its argv and environment.
    img, _vid, pw = volume
    slow = format_image(tmp_path / "slow.img", pw,
                        pbkdf=("--pbkdf", "pbkdf2", "--iter-time", "3000"))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    with Secret.passphrase(pw) as secret:
        running = verifier.start(str(slow), uuid_of(slow), secret)
    try:
        proc = Path(f"/proc/{running.pid}")
        deadline = time.monotonic() + 10
        while b"keyhandoff.verifier" not in (proc / "cmdline").read_bytes():
            assert time.monotonic() < deadline  # the exec has not happened yet
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while (proc / "status").read_text().count("VmLck:\t       0 kB"):
            assert time.monotonic() < deadline  # hardened before it reads the pipe
            time.sleep(0.01)
        assert pw not in (proc / "cmdline").read_bytes()
        environ = (proc / "environ").read_bytes()
        assert pw not in environ
        assert b"NOTIFY_SOCKET" not in environ
    finally:
        running.kill()
        assert running.result() is verifier.Verdict.FAILED  # killed: never "opens"
    assert img.exists()


@pytest.mark.parametrize("code", [0, 1, 2])
def test_a_child_that_fails_is_never_a_verdict(code):
    # 1 is what an uncaught exception exits with: read as "refused" it would drop a
    # right entry.  Verdicts are 10..13; anything else is FAILED.
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", f"raise SystemExit({code})"],
                         dict(os.environ))
    running = verifier.Verification(pid, os.pidfd_open(pid))
    import select  # noqa: PLC0415

    assert select.select([running.fileno()], [], [], 30)[0]
    assert running.result() is verifier.Verdict.FAILED
