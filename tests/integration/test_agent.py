"""The agent against the real systemd-ask-password, real LUKS2 headers, the real keyring."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from agent_process import AgentProcess, ask, ask_file_of, finish, type_answer
from conftest import require_binary
from luks_images import format_image, uuid_of
from passphrases import MARKER, make

from keyhandoff.errors import KeyNotFound
from keyhandoff.secret import Secret


@pytest.fixture
def volume(tmp_path):
    pw = make("vol")
    img = format_image(tmp_path / "disk.img", pw)
    return img, uuid_of(img), pw


def test_answers_from_cache_by_image_path(tmp_path, cache, volume):
    img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path) as agent:
        rc, out = finish(ask(f"--id=cryptsetup:{img}"))
        assert (rc, out) == (0, pw + b"\n")
        agent.wait_for_log("ANSWERED")


def test_answers_by_uuid_path(tmp_path, cache, volume):
    _img, vid, pw = volume
    cache.put(vid, Secret.passphrase(pw), timeout=60)
    with AgentProcess(tmp_path):
        rc, out = finish(ask(f"--id=cryptsetup:/dev/disk/by-uuid/{vid}"))
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
        rc, out = finish(ask(*([ident] if ident else []), timeout=2))
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
        assert finish(ask(f"--id=cryptsetup:{img}")) == (0, pw + b"\n")


def test_retry_after_our_wrong_answer_is_not_answered(tmp_path, cache, volume):
    img, vid, _pw = volume
    cache.put(vid, Secret.passphrase(make("stale")), timeout=60)  # cached, but wrong
    with AgentProcess(tmp_path, retain=0) as agent:
        # first prompt (AcceptCached=1, as systemd-cryptsetup's first try): answered
        first = ask(f"--id=cryptsetup:{img}", "--accept-cached", keyname=agent.keyname)
        rc, _out = finish(first)
        assert rc == 0
        # the volume refused it and asks again (AcceptCached=0): not answered, entry dropped
        rc, out = finish(ask(f"--id=cryptsetup:{img}", timeout=2))
        assert (rc, out) == (1, b"")
        agent.wait_for_log("DROPPED")
    with pytest.raises(KeyNotFound):
        cache.get(vid)


def test_64_simultaneous_prompts(tmp_path, cache):
    images = []
    for i in range(64):
        pw = make(f"m{i}")
        img = format_image(tmp_path / f"d{i}.img", pw)
        cache.put(uuid_of(img), Secret.passphrase(pw), timeout=120)
        images.append((img, pw))
    with AgentProcess(tmp_path) as agent:
        queriers = [(ask(f"--id=cryptsetup:{img}", timeout=20), pw) for img, pw in images]
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
            assert finish(ask(f"--id=cryptsetup:{img}")) == (0, pw + b"\n")


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
        rc, _ = finish(ask(f"--id=cryptsetup:/dev/disk/by-uuid/{uuid.uuid4()}", timeout=2))
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
    q = ask(f"--id=cryptsetup:{img}", timeout=30)
    ask_file = ask_file_of(q)
    socket_path = next(line.split("=", 1)[1] for line in ask_file.read_text().splitlines()
                       if line.startswith("Socket="))
    q.kill()  # the querier dies without removing its ask file and socket
    q.wait()
    try:
        with AgentProcess(tmp_path) as agent:
            agent.wait_for_log("REFUSED")
            assert "ANSWERED" not in agent.log.read_text()
            assert "not alive" in agent.log.read_text() or "PID" in agent.log.read_text()
    finally:
        ask_file.unlink(missing_ok=True)
        Path(socket_path).unlink(missing_ok=True)
