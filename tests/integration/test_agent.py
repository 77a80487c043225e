"""The agent against the real systemd-ask-password, real LUKS2 headers, the real keyring."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest
from agent_process import AgentProcess, ask, ask_file_of, finish, type_answer
from conftest import require_binary
from luks_images import format_image, uuid_of
from passphrases import make

from keyhandoff.cache import PassphraseCache
from keyhandoff.errors import KeyNotFound
from keyhandoff.secret import Secret


@pytest.fixture
def cache():
    c = PassphraseCache()
    yield c
    for e in c.entries():
        c.forget(e.volume)


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


def test_stops_cleanly_on_sigterm_and_is_not_dumpable(tmp_path):
    with AgentProcess(tmp_path) as agent:
        assert agent.proc is not None
        status = open(f"/proc/{agent.proc.pid}/status").read()  # noqa: SIM115
        # non-dumpable processes' /proc files are owned by root and core dumps are off
        assert os.stat(f"/proc/{agent.proc.pid}/environ").st_uid == 0
        assert "VmLck" in status
        assert agent.stop() == 0
        assert "STOPPING" in agent.log.read_text()


def test_unknown_volume_uuid_in_by_uuid_path_is_ignored(tmp_path, cache):
    with AgentProcess(tmp_path, retain=0) as agent:
        rc, _ = finish(ask(f"--id=cryptsetup:/dev/disk/by-uuid/{uuid.uuid4()}", timeout=2))
        assert rc != 0
        assert "ANSWERED" not in agent.log.read_text()
