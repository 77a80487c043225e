"""keyhandoff.efi through the real libefivar, on a scratch efivarfs directory.

libefivar picks its backend in a library constructor when the shared object is loaded, from
``LIBEFIVAR_OPS`` and ``EFIVARFS_PATH``; the pytest process may already have loaded it
without them.  So every test runs its code in a fresh interpreter started with that
environment, which prints one JSON line back.

What a plain directory cannot show (firmware refusing a volatile variable after
ExitBootServices, NV surviving a reboot, 0644 after reboot) is for the OVMF VM tests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import stat
import subprocess
import textwrap
import uuid
from typing import TYPE_CHECKING

import pytest
from support.parts import require_binary
from support.scratch_efi import (
    chattr_immutable,
    is_immutable,
    last_json,
    run_in_child,
    tiny_tmpfs,
)

from keyhandoff import efi

if TYPE_CHECKING:
    from pathlib import Path

GUID = efi.VENDOR_GUID
STASH_FILE = f"KeyHandoffStash-{GUID}"

PREAMBLE = """
import json, sys
from keyhandoff import efi
def out(**kw):
    print(json.dumps(kw))
"""


def run_py(code: str, efivars: Path | None, *, prefix: list[str] | None = None):
    return run_in_child(PREAMBLE + textwrap.dedent(code), efivars, prefix=prefix or (),
                        timeout=60)


def run_json(code: str, efivars: Path | None, **kwargs):
    proc = run_py(code, efivars, **kwargs)
    assert proc.returncode == 0, proc.stderr
    return last_json(proc)


# efivars (the scratch directory), chattr_immutable, is_immutable: support.scratch_efi


# --------------------------------------------------------------------------- round trip


def test_write_read_delete_round_trip(efivars):
    result = run_json(
        """
        var = efi.RECORD_VARIABLE
        var.write(b"record-bytes", efi.RECORD_ATTRIBUTES_NV)
        value = var.read()
        data = bytes(value.data.view())
        value.data.wipe()
        size, attrs, exists = var.size(), var.attributes(), var.exists()
        var.delete()
        out(data=data.hex(), attrs=value.attributes, size=size, attrs2=attrs,
            exists=exists, exists_after=var.exists(), wiped=value.data.wiped)
        """,
        efivars,
    )
    assert bytes.fromhex(result["data"]) == b"record-bytes"
    assert result["attrs"] == result["attrs2"] == 0x7
    assert result["size"] == len(b"record-bytes")
    assert result["exists"] is True
    assert result["exists_after"] is False
    assert result["wiped"] is True
    assert not (efivars / STASH_FILE).exists()


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [(efi.RECORD_ATTRIBUTES_NV, 0x7), (efi.RECORD_ATTRIBUTES_VOLATILE, 0x6)],
)
def test_file_is_attributes_then_data_mode_0600(efivars, attributes, expected):
    run_json(f"efi.RECORD_VARIABLE.write(b'\\x01\\x02payload', {attributes}); out()", efivars)
    path = efivars / STASH_FILE
    raw = path.read_bytes()
    # One write of header and data: 4 bytes of attributes, little endian, then the data.
    assert raw[:4] == expected.to_bytes(4, "little")
    assert raw[4:] == b"\x01\x02payload"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_replacing_keeps_one_variable(efivars):
    result = run_json(
        """
        efi.RECORD_VARIABLE.write(b"first, longer data", efi.RECORD_ATTRIBUTES_NV)
        efi.RECORD_VARIABLE.write(b"second", efi.RECORD_ATTRIBUTES_NV)
        v = efi.RECORD_VARIABLE.read()
        out(data=bytes(v.data.view()).decode())
        """,
        efivars,
    )
    assert result["data"] == "second"
    assert (efivars / STASH_FILE).read_bytes() == b"\x07\0\0\0second"


def test_list_variables(efivars):
    other_guid = str(uuid.UUID(int=0x1234))
    result = run_json(
        f"""
        efi.EfiVariable("BootOrder", "{other_guid}").write(b"\\x01\\x00", 7)
        efi.RECORD_VARIABLE.write(b"x", 7)
        out(names=sorted([v.name, v.guid] for v in efi.list_variables()),
            again=len(efi.list_variables()))
        """,
        efivars,
    )
    assert result["names"] == sorted([["BootOrder", other_guid], ["KeyHandoffStash", GUID]])
    assert result["again"] == 2  # the iterator's static DIR* was run to the end and reset


def test_missing_variable(efivars):
    result = run_json(
        """
        res = {}
        for op in ("read", "delete", "size"):
            try:
                getattr(efi.RECORD_VARIABLE, op)()
            except efi.EfiVariableNotFound as exc:
                res[op] = exc.errno
        out(**res)
        """,
        efivars,
    )
    assert result == {"read": errno.ENOENT, "delete": errno.ENOENT, "size": errno.ENOENT}


def test_names_that_would_escape_the_directory_are_refused():
    # In-process: validation happens before libefivar is called.
    for name in ("../etc/passwd", "a/b", "", "Stash\x00", "Ünïcode", "x" * 129):
        with pytest.raises(ValueError, match="name"):
            efi.EfiVariable(name)
    with pytest.raises(ValueError, match="GUID"):
        efi.EfiVariable("Ok", "7EC2927B-59F1-4933-8945-01041E7137EB")


# --------------------------------------------------------------------------- no backend


def test_without_backend_everything_is_efi_unavailable_not_a_segfault(tmp_path):
    code = """
        res = {"supported": efi.supported(), "probe": efi.probe().runtime_variables}
        for name, op in [("write", lambda: efi.RECORD_VARIABLE.write(b"x", 7)),
                         ("read", efi.RECORD_VARIABLE.read), ("delete", efi.RECORD_VARIABLE.delete),
                         ("list", efi.list_variables), ("size", efi.RECORD_VARIABLE.size)]:
            try:
                op()
                res[name] = "returned"
            except efi.EfiUnavailable:
                res[name] = "EfiUnavailable"
        out(**res)
        """
    expected = {"supported": False, "probe": False}
    expected |= dict.fromkeys(("write", "read", "delete", "list", "size"), "EfiUnavailable")
    # This machine has no EFI: with no environment libefivar falls back to "default" ops.
    assert run_json(code, None) == expected
    # A path that does not exist, without LIBEFIVAR_OPS: the efivarfs probe fails too.
    proc = run_py(code, None, prefix=["env", f"EFIVARFS_PATH={tmp_path}/missing/"])
    assert json.loads(proc.stdout) == expected


def test_the_guard_is_needed_libefivar_segfaults_without_it():
    # Documents why efi.py checks efi_variables_supported() first: the raw call crashes.
    proc = run_py(
        """
        from keyhandoff._bindings._efivar import ffi, lib
        guid = ffi.new("efi_guid_t *")
        lib.efi_str_to_guid(efi.VENDOR_GUID.encode(), guid)
        data = ffi.new("uint8_t[]", b"x")
        lib.efi_set_variable(guid[0], b"KeyHandoffStash", data, 1, 7, 0o600)
        out(survived=True)
        """,
        None,
    )
    assert proc.returncode == -11  # SIGSEGV: ops->set_variable is NULL in the default ops


# --------------------------------------------------------------------------- immutable flag


def test_immutable_flag_is_cleared_and_restored_by_libefivar(efivars):
    # The libefivar fact efi.py relies on, through the raw binding: set_variable clears
    # FS_IMMUTABLE_FL on an existing variable, writes, and sets it again.
    run_json("efi.RECORD_VARIABLE.write(b'one', 7); out()", efivars)
    path = efivars / STASH_FILE
    chattr_immutable(path)  # what real efivarfs does to every new variable
    run_json(
        """
        from keyhandoff._bindings._efivar import ffi, lib
        guid = ffi.new("efi_guid_t *")
        assert lib.efi_str_to_guid(efi.VENDOR_GUID.encode(), guid) == 0
        data = ffi.new("uint8_t[]", b"two")
        assert lib.efi_set_variable(guid[0], b"KeyHandoffStash", data, 3, 7, 0o600) == 0
        out()
        """,
        efivars,
    )
    assert path.read_bytes() == b"\x07\0\0\0two"
    assert is_immutable(path)  # put back after the write


def test_immutable_variable_is_replaced_and_deleted(efivars):
    run_json("efi.RECORD_VARIABLE.write(b'one', 7); out()", efivars)
    path = efivars / STASH_FILE
    chattr_immutable(path)
    run_json("efi.RECORD_VARIABLE.write(b'two', 7); out()", efivars)
    assert path.read_bytes() == b"\x07\0\0\0two"
    chattr_immutable(path)
    run_json("efi.RECORD_VARIABLE.delete(); out()", efivars)
    assert not path.exists()


def test_without_cap_linux_immutable_writes_and_deletes_are_eperm(efivars):
    # A unit whose CapabilityBoundingSet lacks CAP_LINUX_IMMUTABLE hits this on real efivarfs.
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    run_json("efi.RECORD_VARIABLE.write(b'armed', 7); out()", efivars)
    path = efivars / STASH_FILE
    chattr_immutable(path)
    result = run_json(
        """
        res = {}
        for name, op in [("write", lambda: efi.RECORD_VARIABLE.write(b"new", 7)),
                         ("delete", efi.RECORD_VARIABLE.delete)]:
            try:
                op()
                res[name] = "succeeded"
            except efi.EfiPermission as exc:
                res[name] = [type(exc).__name__, exc.errno, str(exc)]
        out(**res)
        """,
        efivars,
        prefix=[setpriv, "--bounding-set=-linux_immutable", "--inh-caps=-linux_immutable"],
    )
    assert result["write"][:2] == ["EfiPermission", errno.EPERM]
    assert result["delete"][:2] == ["EfiPermission", errno.EPERM]
    assert "deleting KeyHandoffStash-" in result["delete"][2]
    assert path.read_bytes() == b"\x07\0\0\0armed"  # untouched


def test_channel_will_not_hand_out_a_record_it_cannot_delete(efivars):
    setpriv = require_binary("setpriv", "apt-get install util-linux")
    run_json("efi.RECORD_VARIABLE.write(b'KHST-not-deletable', 7); out()", efivars)
    chattr_immutable(efivars / STASH_FILE)
    result = run_json(
        """
        try:
            got = efi.RecordVariable().take()
            out(result="returned", data=None if got is None else len(got))
        except efi.EfiPermission:
            out(result="EfiPermission")
        """,
        efivars,
        prefix=[setpriv, "--bounding-set=-linux_immutable", "--inh-caps=-linux_immutable"],
    )
    assert result == {"result": "EfiPermission"}


# --------------------------------------------------------------------------- store full


def test_full_store_is_efi_store_full(tmp_path):
    with tiny_tmpfs(tmp_path / "full") as efivars:
        # Leave no room at all: write() itself then fails with ENOSPC.
        filler = efivars / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            f.write(bytes(64 * 1024))
        result = run_json(
            """
            try:
                efi.RECORD_VARIABLE.write(b"record", efi.RECORD_ATTRIBUTES_NV)
                out(result="written")
            except efi.EfiStoreFull as exc:
                out(result=type(exc).__name__, errno=exc.errno, exists=efi.RECORD_VARIABLE.exists())
            """,
            efivars,
        )
        assert result == {"result": "EfiStoreFull", "errno": errno.ENOSPC, "exists": False}
        assert [p.name for p in efivars.iterdir()] == ["filler"]  # created file removed


def test_short_write_is_not_left_behind(tmp_path):
    # Room for part of the data: write() stores 16 KiB and returns that count; libefivar
    # calls it success.  efi.py checks the stored size and removes the cut variable.
    with tiny_tmpfs(tmp_path / "short") as efivars:
        result = run_json(
            """
            try:
                efi.RECORD_VARIABLE.write(bytes(64 * 1024), efi.RECORD_ATTRIBUTES_NV)
                out(result="written")
            except efi.EfiStoreFull as exc:
                out(result=type(exc).__name__, message=str(exc),
                    exists=efi.RECORD_VARIABLE.exists())
            """,
            efivars,
        )
        assert result["result"] == "EfiStoreFull"
        assert "of 65536 bytes were stored" in result["message"]
        assert result["exists"] is False


def test_firmware_refusal_maps_to_write_refused():
    # SIMULATED: firmware refusing a volatile variable after ExitBootServices (EINVAL) only
    # exists on real firmware (the OVMF VM test covers it); a directory cannot refuse.
    # This checks the one errno funnel efi.py uses for every libefivar failure.
    for err, cls in [
        (errno.EINVAL, efi.EfiWriteRefused),
        (errno.EROFS, efi.EfiWriteRefused),
        (errno.ENOSPC, efi.EfiStoreFull),
        (errno.EPERM, efi.EfiPermission),
        (errno.EACCES, efi.EfiPermission),
        (errno.ENOENT, efi.EfiVariableNotFound),
        (errno.EIO, efi.EfiError),
    ]:
        with pytest.raises(cls) as info:
            efi._raise_for_errno(err, "writing X")
        assert info.value.errno == err
        assert type(info.value) is cls


# --------------------------------------------------------------------------- probe and channel


def test_probe_on_scratch_directory_cleans_up(efivars):
    # A probe variable left by a killed probe is removed first.
    (efivars / f"KeyHandoffProbe-{GUID}").write_bytes(b"\x07\0\0\0stale")
    result = run_json(
        """
        caps = efi.probe()
        out(rt=caps.runtime_variables, nv=caps.nv_writable, vol=caps.volatile_accepted,
            detail=caps.detail)
        """,
        efivars,
    )
    # A directory accepts anything; real firmware refuses volatile at runtime (VM test).
    assert result == {
        "rt": True, "nv": True, "vol": True,
        "detail": "non-volatile: writable; volatile: accepted",
    }
    assert list(efivars.iterdir()) == []


def test_probe_reports_a_store_that_refuses(tmp_path):
    with tiny_tmpfs(tmp_path / "ro", size="4k") as efivars:
        subprocess.run(["mount", "-o", "remount,ro", str(efivars)], check=True)
        result = run_json(
            """
            caps = efi.probe()
            out(rt=caps.runtime_variables, nv=caps.nv_writable, vol=caps.volatile_accepted,
                detail=caps.detail)
            """,
            efivars,
        )
    assert result["rt"] is True
    assert result["nv"] is False
    assert result["vol"] is False
    assert "EfiWriteRefused" in result["detail"]  # EROFS: a read-only efivarfs mount


def test_record_through_the_record_variable(efivars):
    result = run_json(
        """
        import os, time, uuid
        from keyhandoff import record as record_format
        from keyhandoff.secret import Secret
        key = record_format.new_record_key()
        entry = record_format.Entry(uuid.uuid4(), record_format.EntryKind.ONETIME_KEY,
                                    Secret(bytearray(os.urandom(32))))
        expected = bytes(entry.payload.view())
        now = int(time.time())
        record = record_format.HandoffRecord(record_format.RecordChannel.EFI, now, now + 600, 1,
                                             uuid.uuid4(), (entry,))
        channel = efi.RecordVariable()
        channel.store(record_format.seal(record, key))
        path = os.environ["EFIVARFS_PATH"] + "KeyHandoffStash-" + efi.VENDOR_GUID
        mode = oct(os.stat(path).st_mode & 0o777)
        blob = channel.take()
        gone = not efi.RECORD_VARIABLE.exists()
        opened = record_format.open_record(blob.view(), key, now=now, boot_id=uuid.uuid4(),
                                           channel=record_format.RecordChannel.EFI)
        same = bytes(opened.entries[0].payload.view()) == expected
        opened.wipe(); blob.wipe()
        out(mode=mode, gone=gone, same=same, again=channel.take() is None)
        """,
        efivars,
    )
    assert result == {"mode": "0o600", "gone": True, "same": True, "again": True}
