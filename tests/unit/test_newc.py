"""keyhandoff.newc: what GNU cpio unpacks, laid out as the kernel reads it; bad names refused."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from support.parts import require_binary
from support.passphrases import make

from keyhandoff import newc
from keyhandoff.errors import InvalidArchiveEntry, SecretError
from keyhandoff.newc import Archive
from keyhandoff.secret import Secret

# every byte value, and lengths 0..7 so every data padding (0..3) occurs
FILES = {
    "init": (0o100755, b"#!/bin/sh\nexec /bin/sh\n"),
    "etc/keyhandoff/all-bytes": (0o644, bytes(range(256))),
    "etc/keyhandoff/secret": (0o600, b"\0\x01not secret here\xff"),
    "empty": (0o400, b""),
    **{f"pad/len{n}": (0o640, b"x" * n) for n in range(8)},
    "explicit-dir": (stat.S_IFDIR | 0o700, b""),
}


def _unpack(data: bytes, into) -> subprocess.CompletedProcess[bytes]:
    cpio = require_binary("cpio", "apt-get install cpio")
    return subprocess.run([cpio, "-idmv", "--no-absolute-filenames"], input=data, cwd=into,
                          capture_output=True, check=True, timeout=60)


def _members(data: bytes) -> list[dict]:
    """Walk the archive as the kernel's do_header() does, checking every alignment and pad."""
    found = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at {pos} is not 4-aligned"
        header = data[pos : pos + 110]
        assert header[:6] == newc.MAGIC
        fields = [header[6 + 8 * i : 14 + 8 * i] for i in range(13)]
        assert all(len(f) == 8 and f == f.lower() for f in fields)
        values = [int(f, 16) for f in fields]
        names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "size", "maj", "min",
                 "rmaj", "rmin", "namesize", "check")
        member = dict(zip(names, values, strict=True))
        name_end = pos + 110 + member["namesize"]
        assert data[name_end - 1] == 0  # the name's NUL is counted in namesize
        member["name"] = data[pos + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        assert data[name_end:data_start] == bytes(data_start - name_end)
        assert data_start % 4 == 0
        member["data"] = data[data_start : data_start + member["size"]]
        end = data_start + member["size"]
        next_pos = end + (-end % 4)
        assert data[end:next_pos] == bytes(next_pos - end)
        found.append(member)
        pos = next_pos
        if member["name"] == newc.TRAILER:
            assert pos == len(data)
            return found


def test_gnu_cpio_unpacks_names_modes_and_contents(tmp_path):
    archive = Archive(FILES)
    data = archive.to_bytes()
    listed = _unpack(data, tmp_path).stderr.decode().splitlines()
    assert listed[:-1] == list(archive.names)  # cpio -v lists in archive order
    for name, (mode, content) in FILES.items():
        st = os.lstat(tmp_path / name)
        assert stat.S_IMODE(st.st_mode) == mode & 0o7777, name
        if stat.S_ISDIR(mode):
            assert stat.S_ISDIR(st.st_mode)
            continue
        assert stat.S_ISREG(st.st_mode), name
        assert (tmp_path / name).read_bytes() == content, name
        assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (0, 0, 0), name
    for implied in ("etc", "etc/keyhandoff", "pad"):
        st = os.lstat(tmp_path / implied)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o755


def test_the_layout_is_the_kernels_header_name_data_and_padding():
    archive = Archive(FILES)
    data = archive.to_bytes()
    assert len(data) == archive.size
    assert len(data) % 4 == 0
    members = _members(data)
    assert [m["name"] for m in members] == [*archive.names, newc.TRAILER]
    by_name = {m["name"]: m for m in members}
    for name, (mode, content) in FILES.items():
        member = by_name[name]
        assert member["data"] == content
        expected_type = stat.S_IFDIR if stat.S_ISDIR(mode) else stat.S_IFREG
        assert member["mode"] == expected_type | (mode & 0o7777)
        assert member["nlink"] == (2 if stat.S_ISDIR(mode) else 1)
    for member in members:
        assert (member["uid"], member["gid"], member["mtime"], member["check"]) == (0, 0, 0, 0)
    inodes = [m["ino"] for m in members[:-1]]
    assert sorted(inodes) == list(range(1, len(inodes) + 1))
    trailer = members[-1]
    assert (trailer["size"], trailer["mode"], trailer["namesize"]) == (0, 0, 11)


def test_parents_come_before_what_they_hold_in_byte_order():
    archive = Archive({"b": (0o644, b""), "a-b/c": (0o644, b""), "a/b": (0o644, b"")})
    assert archive.names == ("a", "a-b", "a-b/c", "a/b", "b")


def test_without_parents_only_the_given_names_are_written():
    archive = Archive({"run/keyhandoff/x": (0o600, b"1")}, parents=False)
    assert archive.names == ("run/keyhandoff/x",)


def test_a_listed_directory_is_not_written_twice():
    archive = Archive({"d": (stat.S_IFDIR | 0o700, b""), "d/f": (0o600, b"1")})
    assert archive.names == ("d", "d/f")
    assert _members(archive.to_bytes())[0]["mode"] == stat.S_IFDIR | 0o700


@pytest.mark.parametrize(("name", "why"), [
    ("../etc/shadow", "'..' component"),
    ("a/../../b", "'..' component"),
    ("a/..", "'..' component"),
    ("/etc/passwd", "absolute"),
    ("a\0b", "NUL"),
    ("", "empty"),
    (".", "'.' component"),
    ("./init", "'.' component"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("TRAILER!!!", "end-of-archive"),
    ("x" * 4096, "4095 bytes"),
    ("d/" + "y" * 256, "longer than 255"),
])
def test_hostile_names_are_refused_with_the_reason(name, why):
    with pytest.raises(InvalidArchiveEntry) as info:
        Archive({name: (0o644, b"data")})
    assert why in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_name_of_the_longest_length_is_written():
    name = "/".join(["n" * 255] * 16)[:4095]
    assert Archive({name: (0o644, b"")}).names[-1] == name


@pytest.mark.parametrize(("mode", "data", "why"), [
    (stat.S_IFLNK | 0o777, b"target", "only regular files and directories"),
    (stat.S_IFCHR | 0o600, b"", "only regular files and directories"),
    (-1, b"", "not a file mode"),
    (True, b"", "not a file mode"),
    (stat.S_IFDIR | 0o755, b"data", "a directory has no data"),
])
def test_other_types_and_modes_are_refused(mode, data, why):
    with pytest.raises(InvalidArchiveEntry, match=why):
        Archive({"e": (mode, data)})


def test_data_of_another_type_is_a_type_error():
    with pytest.raises(TypeError):
        Archive({"e": (0o644, "text")})  # type: ignore[dict-item]


def test_a_file_cannot_hold_another_entry():
    with pytest.raises(InvalidArchiveEntry, match="inside 'a', which is a file"):
        Archive({"a": (0o644, b"file"), "a/b": (0o644, b"")})


def test_data_larger_than_a_size_field_is_refused(monkeypatch):
    assert newc.FIELD_MAX == 0xFFFF_FFFF
    monkeypatch.setattr(newc, "FIELD_MAX", 3)
    Archive({"fits": (0o644, b"123")})
    with pytest.raises(InvalidArchiveEntry, match="does not fit a newc size field"):
        Archive({"big": (0o644, b"1234")})


def test_secret_data_reaches_the_descriptor_as_a_view_of_its_own_buffer(monkeypatch, tmp_path):
    pw = make("newc")
    secret = Secret(bytearray(pw))
    archive = Archive({"k/pw": (0o600, secret), "other": (0o644, b"plain")})
    writes = []
    real_write = os.write

    def recording_write(fd, data):
        writes.append(data.obj if isinstance(data, memoryview) else data)  # what holds the bytes
        return real_write(fd, data)

    monkeypatch.setattr(newc.os, "write", recording_write)
    path = tmp_path / "archive"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        assert archive.write(fd) == archive.size
    finally:
        os.close(fd)
    monkeypatch.undo()
    # the secret went out once, straight from the Secret's own bytearray ...
    assert sum(owner is secret.buffer() for owner in writes) == 1
    # ... and nothing else handed to write(2) held it (no bytes copy of it was made)
    assert all(pw not in owner for owner in writes if owner is not secret.buffer())
    unpacked = tmp_path / "out"
    unpacked.mkdir()
    _unpack(path.read_bytes(), unpacked)
    assert (unpacked / "k/pw").read_bytes() == pw
    secret.wipe()


def test_an_archive_holding_a_secret_is_never_bytes_and_shows_none():
    pw = make("newc-repr")
    with Secret(bytearray(pw)) as secret:
        archive = Archive({"pw": (0o600, secret)})
        assert archive.holds_secret
        with pytest.raises(TypeError, match="only written to a descriptor"):
            archive.to_bytes()
        assert pw.decode() not in repr(archive)
        with pytest.raises(InvalidArchiveEntry) as info:
            Archive({"dir": (stat.S_IFDIR | 0o700, secret)})
        assert pw.decode() not in str(info.value)


def test_a_wiped_secret_is_refused_at_write_time(tmp_path):
    secret = Secret(bytearray(make("newc-wiped")))
    archive = Archive({"pw": (0o600, secret)})
    secret.wipe()
    fd = os.open(tmp_path / "a", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with pytest.raises(SecretError):
            archive.write(fd)
        assert os.fstat(fd).st_size == 0  # not even the header promising an empty file
    finally:
        os.close(fd)


def test_the_same_files_give_the_same_bytes():
    assert Archive(FILES).to_bytes() == Archive(dict(reversed(FILES.items()))).to_bytes()
