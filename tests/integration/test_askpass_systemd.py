"""keyhandoff.askpass against the real systemd 252 querier and agent, and send_reply's refusals.

* Interop: the real ``systemd-ask-password`` writes its ask file in the real
  /run/systemd/ask-password (hardcoded there); we read it, reply, and the querier prints
  what it got.  The passphrase travels only in the datagram, never in argv.  Other tests
  may run queriers in the same directory at the same time: we only touch the ask file
  whose ``PID=`` is our querier's.
* Refusals: a private ask directory holding a hand-written ask file and a recording socket
  of the test's own where ``Socket=`` points; each hostile twist must leave the recorder
  empty, and the same setup without the twist must deliver (the positive control that
  makes the zero-datagram assertions mean something).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from support.agent_process import stop_querier
from support.luks_images import format_image
from support.parts import require, require_binary
from support.passphrases import make

from keyhandoff import reply
from keyhandoff.askpass import (
    ASK_DIR,
    AskRequest,
    CryptsetupPrompt,
    HostileAskFile,
    Refused,
    ReplyFailed,
    list_ask_files,
    parse_ask_file,
    read_ask_file,
)
from keyhandoff.cescape import cescape
from keyhandoff.reply import cancel_datagram, reply_datagram, send_reply
from keyhandoff.secret import Secret

INSTALL = "apt-get install systemd"
NOBODY = 65534


# --- the real querier ----------------------------------------------------------------------


def cancel_and_wait(proc: subprocess.Popen[bytes], name: str, request: AskRequest) -> None:
    send_reply(ASK_DIR, name, request, cancel_datagram())
    proc.communicate(timeout=10)
    assert proc.returncode != 0
    assert name not in list(list_ask_files(ASK_DIR))


def wait_for_ask_file(pid: int, timeout: float = 5.0) -> tuple[str, AskRequest]:
    """The ask file of querier ``pid``: a bounded poll (the querier renames it into place)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in list_ask_files(ASK_DIR):
            with contextlib.suppress(FileNotFoundError, HostileAskFile):
                request = read_ask_file(ASK_DIR, name)
                if request.pid == pid:
                    return name, request
        time.sleep(0.02)
    pytest.fail(f"querier {pid} wrote no ask file within {timeout} s")


def answer(proc: subprocess.Popen[bytes], datagram: Secret | bytes) -> tuple[bytes, bytes]:
    name, request = wait_for_ask_file(proc.pid)
    send_reply(ASK_DIR, name, request, datagram)
    return proc.communicate(timeout=10)


def cryptsetup_id() -> tuple[str, str]:
    source = f"/dev/disk/by-uuid/{uuid.uuid4()}"
    return source, "cryptsetup:" + cescape(source.encode())


def test_querier_ask_file_is_what_we_parse(querier):
    source, id_ = cryptsetup_id()
    proc = querier(id_=id_, message="Please enter passphrase for disk test:")
    name, request = wait_for_ask_file(proc.pid)
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert name.startswith("ask.")
    assert request.pid == proc.pid
    assert request.id == id_
    assert request.prompt == CryptsetupPrompt(source)
    assert request.message == "Please enter passphrase for disk test:"
    assert (request.accept_cached, request.echo, request.silent) == (False, False, False)
    assert now_us < request.not_after <= now_us + 5_000_000
    assert os.path.dirname(request.socket) == ASK_DIR
    assert os.path.basename(request.socket).startswith("sck.")
    cancel_and_wait(proc, name, request)


def test_querier_prints_exactly_the_passphrase(querier):
    _, id_ = cryptsetup_id()
    proc = querier(id_=id_)
    passphrase = make("interop")
    with Secret.passphrase(passphrase) as secret, reply_datagram(secret) as datagram:
        out, _err = answer(proc, datagram)
    assert proc.returncode == 0
    assert out == passphrase + b"\n"


def test_sigterm_teardown_leaves_no_files(querier):
    proc = querier(id_=cryptsetup_id()[1])
    name, request = wait_for_ask_file(proc.pid)
    proc.terminate()
    proc.communicate(timeout=10)
    assert name not in list(list_ask_files(ASK_DIR))
    assert not os.path.exists(request.socket)


def test_querier_removes_its_ask_file_after_the_answer(querier):
    proc = querier(id_=cryptsetup_id()[1])
    name, request = wait_for_ask_file(proc.pid)
    with Secret.passphrase(make("gone")) as secret, reply_datagram(secret) as datagram:
        send_reply(ASK_DIR, name, request, datagram)
    proc.communicate(timeout=10)
    assert name not in list(list_ask_files(ASK_DIR))
    assert not os.path.exists(request.socket)
    # ... and a late second answer is refused, not sent into the void.
    with (
        Secret.passphrase(make("late")) as secret,
        reply_datagram(secret) as datagram,
        pytest.raises(Refused, match="gone"),
    ):
        send_reply(ASK_DIR, name, request, datagram)


def test_v252_reads_a_trailing_nul_like_no_nul(querier):
    # systemd's own agent sends "+pw\0"; we send "+pw".  Both must print pw.
    proc = querier(id_=cryptsetup_id()[1])
    passphrase = make("nul")
    with Secret(b"+" + passphrase + b"\x00") as datagram:
        out, _err = answer(proc, datagram)
    assert proc.returncode == 0
    assert out == passphrase + b"\n"


def test_cancel_makes_the_querier_fail(querier):
    proc = querier(id_=cryptsetup_id()[1])
    out, err = answer(proc, cancel_datagram())
    assert proc.returncode != 0
    assert out == b""
    assert b"canceled" in err.lower() or b"cancelled" in err.lower()


def test_2048_byte_passphrase_arrives_whole(querier):
    proc = querier(id_=cryptsetup_id()[1])
    passphrase = (make("long") * 200)[:2048]
    with Secret.passphrase(passphrase) as secret, reply_datagram(secret) as datagram:
        out, _err = answer(proc, datagram)
    assert out == passphrase + b"\n"


def test_v252_truncates_a_2049_byte_passphrase_to_2048(querier):
    # reply_datagram refuses 2049 bytes; this hand-built datagram shows why: v252 reads
    # 2049 bytes ("+" and 2048) and silently drops the rest (no MSG_TRUNC check).
    proc = querier(id_=cryptsetup_id()[1])
    passphrase = (make("toolong") * 200)[:2049]
    with Secret(b"+" + passphrase) as datagram:
        out, _err = answer(proc, datagram)
    assert proc.returncode == 0
    assert out == passphrase[:2048] + b"\n"


def test_v252_truncates_the_reference_agents_2048_plus_nul(querier):
    # systemd's agent form for a 2048-byte passphrase is 2050 bytes; v252 cuts the NUL
    # (harmless), v257+ would drop the datagram (why reply_datagram sends no NUL).
    proc = querier(id_=cryptsetup_id()[1])
    passphrase = (make("refagent") * 200)[:2048]
    with Secret(b"+" + passphrase + b"\x00") as datagram:
        out, _err = answer(proc, datagram)
    assert out == passphrase + b"\n"


def test_tty_agent_lists_the_ask_file_we_list(querier):
    agent = require_binary("systemd-tty-ask-password-agent", INSTALL)
    message = f"keyhandoff list probe {secrets.token_hex(4)}"
    proc = querier(id_=cryptsetup_id()[1], message=message)
    name, request = wait_for_ask_file(proc.pid)
    assert name in list(list_ask_files(ASK_DIR))
    listed = subprocess.run(
        [agent, "--list"], capture_output=True, check=True, timeout=10, stdin=subprocess.DEVNULL
    ).stdout.decode()
    assert f"'{message}' (PID {proc.pid})" in listed.splitlines()
    ours = [n for n in list_ask_files(ASK_DIR) if _pid_of(n) == proc.pid]
    assert ours == [name]
    cancel_and_wait(proc, name, request)


def test_systemd_cryptsetup_writes_a_cescaped_source_we_read_back(tmp_path):
    # The real prompt, not our reading of the source: systemd-cryptsetup 252 on an image
    # file whose path needs escaping (space, UTF-8, backslash, tab).  We cancel: nothing
    # is answered, so nothing is cached in @u.
    binary = "/lib/systemd/systemd-cryptsetup"
    require(os.access(binary, os.X_OK), binary, INSTALL)
    os.makedirs(ASK_DIR, mode=0o755, exist_ok=True)
    image = format_image(tmp_path / "disk \u00e9\\x\ty.img", make("csid"))
    volume = f"khid{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [binary, "attach", volume, str(image), "none", "luks,timeout=10"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        name, request = wait_for_ask_file(proc.pid, timeout=10)
        assert request.id == "cryptsetup:" + cescape(os.fsencode(image))
        assert "\\303\\251" in (request.id or "")  # UTF-8 bytes as octal, as cescape does
        assert request.prompt == CryptsetupPrompt(str(image))
        assert request.accept_cached is True  # the first prompt
        assert request.icon == "drive-harddisk"
        assert request.message == f"Please enter passphrase for disk {volume}:"
        cancel_and_wait(proc, name, request)
    finally:
        stop_querier(proc)


def test_accept_cached_is_what_the_querier_was_told(querier):
    # --accept-cached without --keyname: the flag reaches the ask file, no keyring is read
    proc = querier(id_=cryptsetup_id()[1], extra=("--accept-cached",))
    name, request = wait_for_ask_file(proc.pid)
    assert request.accept_cached is True
    cancel_and_wait(proc, name, request)


# systemd-cryptsetup's retries need device-mapper: tests/vm/test_cryptsetup_retry.py


def _pid_of(name: str) -> int | None:
    try:
        return read_ask_file(ASK_DIR, name).pid
    except (FileNotFoundError, HostileAskFile):
        return None


# --- send_reply's refusals, on a private directory -----------------------------------------


class Scene:
    """A private ask directory with a hand-written ask file and a recording socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "ask-password"
        self.dir.mkdir(mode=0o755)
        self.socket_path = self.dir / f"sck.{secrets.token_hex(8)}"
        self.recorder = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.recorder.bind(str(self.socket_path))
        self.recorder.settimeout(0)
        self.ask_name = f"ask.{secrets.token_hex(3)}"

    def write(self, *, socket_path: str | None = None, pid: int | None = None, **extra: str) -> str:
        lines = [
            "[Ask]",
            f"PID={os.getpid() if pid is None else pid}",
            f"Socket={self.socket_path if socket_path is None else socket_path}",
            "AcceptCached=1",
            "Echo=0",
            f"NotAfter={extra.pop('NotAfter', '0')}",
            "Silent=0",
            "Message=Please enter passphrase for disk test:",
            "Id=cryptsetup:/dev/disk/by-uuid/0000",
        ]
        lines += [f"{key}={value}" for key, value in extra.items()]
        (self.dir / self.ask_name).write_text("\n".join(lines) + "\n")
        return self.ask_name

    def request(self) -> AskRequest:
        return read_ask_file(self.dir, self.ask_name)

    def received(self) -> list[bytes]:
        got = []
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(self.recorder.recv(65536))
        return got

    def close(self) -> None:
        self.recorder.close()


@pytest.fixture
def scene(tmp_path):
    made = Scene(tmp_path)
    yield made
    made.close()


@pytest.fixture
def passphrase_datagram():
    passphrase = make("scene")
    with Secret.passphrase(passphrase) as secret, reply_datagram(secret) as datagram:
        yield passphrase, datagram


def assert_refused(scene, ask_path, request, datagram, reason):
    with pytest.raises(Refused, match=reason):
        send_reply(scene.dir, ask_path, request, datagram)
    assert scene.received() == []


def test_control_a_proper_scene_delivers_exactly_one_datagram(scene, passphrase_datagram):
    passphrase, datagram = passphrase_datagram
    scene.write()
    send_reply(scene.dir, scene.ask_name, scene.request(), datagram)
    assert scene.received() == [b"+" + passphrase]


def test_control_ask_path_may_be_a_full_path(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    send_reply(scene.dir, scene.dir / scene.ask_name, scene.request(), datagram)
    assert len(scene.received()) == 1


def test_control_cancel_is_delivered(scene):
    scene.write()
    send_reply(scene.dir, scene.ask_name, scene.request(), cancel_datagram())
    assert scene.received() == [b"-"]


def test_control_v257_double_slash_socket_path(scene):
    scene.write(socket_path=f"/{scene.dir}//{scene.socket_path.name}")
    send_reply(scene.dir, scene.ask_name, scene.request(), cancel_datagram())
    assert scene.received() == [b"-"]


def test_control_parent_symlink_to_the_ask_dir_itself_is_the_same_dir(scene):
    alias = scene.root / "alias"
    alias.symlink_to(scene.dir)
    scene.write(socket_path=str(alias / scene.socket_path.name))
    send_reply(scene.dir, scene.ask_name, scene.request(), cancel_datagram())
    assert scene.received() == [b"-"]


def test_symlinked_ask_file_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    request = scene.request()
    real = scene.root / "real-ask"
    (scene.dir / scene.ask_name).rename(real)
    (scene.dir / scene.ask_name).symlink_to(real)
    with pytest.raises(HostileAskFile, match="symlink"):
        read_ask_file(scene.dir, scene.ask_name)
    assert_refused(scene, scene.ask_name, request, datagram, "not a regular file")


def test_ask_file_in_another_directory_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    other = scene.root / "other"
    other.mkdir()
    (other / scene.ask_name).write_bytes((scene.dir / scene.ask_name).read_bytes())
    assert_refused(scene, other / scene.ask_name, scene.request(), datagram, "not in the ask")


def test_ask_file_not_owned_by_root_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    os.chown(scene.dir / scene.ask_name, NOBODY, NOBODY)
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "not owned by root")


def test_gone_ask_file_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    request = scene.request()
    (scene.dir / scene.ask_name).unlink()
    assert_refused(scene, scene.ask_name, request, datagram, "gone")


def test_socket_outside_the_dir_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    outside = scene.root / "outside"
    outside.mkdir()
    path = outside / "sck.evil"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as evil:
        evil.bind(str(path))
        evil.settimeout(0)
        scene.write(socket_path=str(path))
        assert_refused(scene, scene.ask_name, scene.request(), datagram, "outside")
        with pytest.raises(BlockingIOError):
            evil.recv(65536)


def test_socket_dotdot_out_of_the_dir_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    path = scene.root / "sck.up"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as evil:
        evil.bind(str(path))
        evil.settimeout(0)
        scene.write(socket_path=f"{scene.dir}/../sck.up")
        assert_refused(scene, scene.ask_name, scene.request(), datagram, "outside")
        with pytest.raises(BlockingIOError):
            evil.recv(65536)


def test_socket_through_a_symlink_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    link = scene.dir / "sck.link"
    link.symlink_to(scene.socket_path)  # even pointing at a good socket: never follow
    scene.write(socket_path=str(link))
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "symlink")


def test_socket_through_a_symlinked_parent_elsewhere_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    outside = scene.root / "outside"
    outside.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as evil:
        evil.bind(str(outside / "sck.evil"))
        evil.settimeout(0)
        (scene.dir / "sub").symlink_to(outside)
        scene.write(socket_path=f"{scene.dir}/sub/sck.evil")
        assert_refused(scene, scene.ask_name, scene.request(), datagram, "outside")
        with pytest.raises(BlockingIOError):
            evil.recv(65536)


def test_socket_owned_by_another_uid_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    os.chown(scene.socket_path, NOBODY, NOBODY)
    scene.write()
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "not owned by root")


def test_fifo_instead_of_a_socket_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    fifo = scene.dir / "sck.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        scene.write(socket_path=str(fifo))
        assert_refused(scene, scene.ask_name, scene.request(), datagram, "not a socket")
        assert os.read(reader, 65536) == b""
    finally:
        os.close(reader)


def test_regular_file_instead_of_a_socket_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    plain = scene.dir / "sck.file"
    plain.write_bytes(b"")
    scene.write(socket_path=str(plain))
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "not a socket")
    assert plain.read_bytes() == b""


def test_socket_name_without_sck_prefix_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    other = scene.dir / "ask.notasocket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as evil:
        evil.bind(str(other))
        evil.settimeout(0)
        scene.write(socket_path=str(other))
        assert_refused(scene, scene.ask_name, scene.request(), datagram, "sck")
        with pytest.raises(BlockingIOError):
            evil.recv(65536)


def test_missing_socket_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write(socket_path=str(scene.dir / "sck.absent"))
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "does not exist")


def test_dead_pid_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its PID now names no process (until reuse, milliseconds away)
    scene.write(pid=child.pid)
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "not alive")


def test_not_after_in_the_past_is_refused(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    past = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 - 1
    scene.write(NotAfter=str(past))
    assert_refused(scene, scene.ask_name, scene.request(), datagram, "NotAfter")


def test_not_after_in_the_future_is_accepted(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    future = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000 + 60_000_000
    scene.write(NotAfter=str(future))
    send_reply(scene.dir, scene.ask_name, scene.request(), datagram)
    assert len(scene.received()) == 1


def test_duplicate_key_never_reaches_the_socket(scene):
    scene.write(Socket=str(scene.socket_path))  # the injected second Socket=
    with pytest.raises(HostileAskFile, match="duplicated Socket="):
        scene.request()
    assert scene.received() == []


def test_bare_passphrase_bytes_are_refused(scene):
    scene.write()
    passphrase = make("bytes")
    with pytest.raises(Refused) as caught:
        send_reply(scene.dir, scene.ask_name, scene.request(), passphrase)
    assert passphrase.decode() not in str(caught.value)
    assert scene.received() == []


def test_secret_that_is_not_a_reply_datagram_is_refused(scene):
    scene.write()
    with Secret.passphrase(b"-" + make("dash")) as raw:
        assert_refused(scene, scene.ask_name, scene.request(), raw, "reply_datagram")


def test_socket_nobody_reads_fails_loudly(scene, passphrase_datagram):
    _, datagram = passphrase_datagram
    scene.write()
    scene.recorder.close()  # the path stays, the socket behind it is gone
    with pytest.raises(ReplyFailed) as caught:
        send_reply(scene.dir, scene.ask_name, scene.request(), datagram)
    assert caught.value.errno == 111  # ECONNREFUSED


def test_pinned_socket_wins_over_a_swap_after_the_checks(scene):
    # The TOCTOU the O_PATH pin closes: after the checks, the path is re-pointed at an
    # attacker's socket; the datagram must still reach the inode that was checked.
    scene.write()
    dir_fd = os.open(scene.dir, os.O_PATH | os.O_DIRECTORY)
    try:
        sock_fd = reply._pin_socket(dir_fd, os.fstat(dir_fd), str(scene.socket_path))
    finally:
        os.close(dir_fd)
    try:
        os.unlink(scene.socket_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as evil:
            evil.bind(str(scene.socket_path))
            evil.settimeout(0)
            reply._send(sock_fd, cancel_datagram())
            with pytest.raises(BlockingIOError):
                evil.recv(65536)
        assert scene.received() == [b"-"]
    finally:
        os.close(sock_fd)


def test_parse_of_a_real_ask_file_matches_read(querier):
    proc = querier(id_=cryptsetup_id()[1])
    name, request = wait_for_ask_file(proc.pid)
    data = (Path(ASK_DIR) / name).read_bytes()
    assert parse_ask_file(data) == request
    cancel_and_wait(proc, name, request)
