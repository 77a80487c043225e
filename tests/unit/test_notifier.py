"""keyhandoff.process.Notifier: sd_notify over real AF_UNIX datagram sockets, never blocking.

The reader is a socket the test binds and reads (or does not read); the queue fills after
``net.unix.max_dgram_qlen`` datagrams, as a stopped service manager's would.  Every call
under test runs in a thread joined with a bound, so a blocking send fails the test instead
of hanging it.
"""

from __future__ import annotations

import socket
import threading
import uuid

import pytest

from keyhandoff.process import Notifier


def bounded(fn, *args, **kwargs):
    """Run ``fn`` in a thread; fail if it has not returned within 10 s (it blocked)."""
    worker = threading.Thread(target=fn, args=args, kwargs=kwargs, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), f"{fn.__name__} blocked"


@pytest.fixture
def reader(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0)
    yield sock, str(tmp_path / "notify.sock")
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096))
        except BlockingIOError:
            return got


def fill(path: str) -> socket.socket:
    """Fill the reader's queue from another socket until the kernel says it is full."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.connect(path)
    sent = 0
    while True:
        try:
            filler.send(b"filler", socket.MSG_DONTWAIT)
            sent += 1
        except BlockingIOError:
            break
        assert sent < 10_000
    return filler


def test_ready_and_status_in_one_datagram(reader):
    sock, path = reader
    n = Notifier(path)
    bounded(n.notify, state="READY=1", status="answered 0")
    assert drain(sock) == [b"READY=1\nSTATUS=answered 0"]
    bounded(n.notify, status="answered 1")
    assert drain(sock) == [b"STATUS=answered 1"]
    assert not n.wants_write
    assert n.dropped == 0


def test_a_reader_that_stops_never_blocks_and_status_lines_coalesce(reader):
    sock, path = reader
    n = Notifier(path)
    with fill(path):
        bounded(n.notify, state="READY=1", status="s0")
        for i in range(1, 50):
            bounded(n.notify, status=f"s{i}")
        assert n.wants_write  # the loop waits for writable, not for the reader
        assert n.fileno() >= 0
        assert n.dropped == 49  # every unsent status was replaced by the newer one
        queued = drain(sock)
        assert queued
        assert all(d == b"filler" for d in queued)  # nothing of ours while it was full
        bounded(n.flush)
        # READY=1 was kept until it could go, with the newest status only
        assert drain(sock) == [b"READY=1\nSTATUS=s49"]
        assert not n.wants_write


def test_final_tries_once_and_gives_up_on_a_full_queue(reader):
    sock, path = reader
    n = Notifier(path)
    with fill(path):
        bounded(n.final, "STOPPING=1", "bye")
        assert n.dropped == 1
        assert not n.wants_write
        queued = drain(sock)
        assert queued
        assert all(d == b"filler" for d in queued)  # nothing of ours while it was full
    bounded(n.final, "STOPPING=1", "bye")  # room again: it goes out
    assert drain(sock) == [b"STOPPING=1\nSTATUS=bye"]


def test_abstract_address():
    name = f"keyhandoff-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(0)
        n = Notifier("@" + name)
        bounded(n.notify, state="READY=1")
        assert drain(sock) == [b"READY=1"]


def test_nobody_listening_drops_without_raising(tmp_path, reader):
    sock, path = reader
    n = Notifier(path)
    bounded(n.notify, state="READY=1")
    assert drain(sock) == [b"READY=1"]
    sock.close()  # the reader goes away; its path stays
    bounded(n.notify, status="after")
    assert n.dropped == 1
    assert not n.wants_write
    absent = Notifier(str(tmp_path / "absent.sock"))
    bounded(absent.notify, state="READY=1", status="x")
    assert absent.dropped == 1


def test_a_new_reader_at_the_same_path_is_found_again(tmp_path, reader):
    sock, path = reader
    n = Notifier(path)
    bounded(n.notify, status="one")
    assert drain(sock) == [b"STATUS=one"]
    sock.close()
    (tmp_path / "notify.sock").unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)
        again.settimeout(0)
        bounded(n.notify, status="two")
        assert drain(again) == [b"STATUS=two"]


@pytest.mark.parametrize("address", ["", "relative/path", "vsock:2:1234"])
def test_unknown_or_missing_address_does_nothing(address):
    n = Notifier(address)
    assert not n.enabled
    bounded(n.notify, state="READY=1", status="x")
    bounded(n.final, "STOPPING=1")
    assert not n.wants_write
