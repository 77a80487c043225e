"""LUKS image files for tests, made by the real cryptsetup binary.

Passphrases reach cryptsetup on stdin (``--key-file=-``), never in argv or the environment.
Also a pytest plugin (tests/conftest.py): the ``person`` and ``image`` fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support.parts import require, require_binary
from support.passphrases import make

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

INSTALL = "apt-get install cryptsetup-bin"
MIB = 1024 * 1024
FAST = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")


def cryptsetup(
    *args: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    binary = require_binary("cryptsetup", INSTALL)
    return subprocess.run([binary, *args], input=stdin, capture_output=True, check=check)


def format_image(
    path: Path, passphrase: bytes, *, luks: str = "luks2", pbkdf: tuple[str, ...] = FAST,
    options: Sequence[str] = (), size: int = 20 * MIB,
) -> Path:
    """A ``size``-byte file made a LUKS volume by ``cryptsetup luksFormat``, then returned.

    ``options``: further luksFormat options (``--uuid``, ``--header``, metadata sizes...).
    LUKS1 takes the iteration count but has no ``--pbkdf`` choice: that part is dropped.
    """
    with path.open("wb") as f:
        f.truncate(size)
    if luks == "luks1":
        pbkdf = tuple(a for a in pbkdf if a not in {"--pbkdf", "pbkdf2"})
    cryptsetup(
        "luksFormat", "--type", luks, *pbkdf, *options, "--batch-mode", "--key-file=-",
        str(path), stdin=passphrase,
    )
    return path


def add_key(path: Path, existing: bytes, new: bytes) -> None:
    """luksAddKey reading the existing passphrase from a pipe and the new one from stdin.

    cryptsetup takes the existing passphrase from stdin (``--key-file=-``) and the new key
    from a file argument; /dev/fd/N of a pipe keeps it off disk and out of argv.
    """
    r, w = os.pipe()
    try:
        os.write(w, new)
        os.close(w)
        w = -1
        binary = require_binary("cryptsetup", INSTALL)
        subprocess.run(
            [binary, "luksAddKey", *FAST, "--batch-mode", "--key-file=-", str(path),
             f"/dev/fd/{r}"],
            input=existing, capture_output=True, check=True, pass_fds=(r,),
        )
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def opens(path: Path, key: bytes, keyslot: int | None = None) -> bool:
    """Whether cryptsetup accepts ``key`` (in ``keyslot`` if given), without activating."""
    slot = ("--key-slot", str(keyslot)) if keyslot is not None else ()
    result = cryptsetup(
        "open", "--test-passphrase", *slot, "--key-file=-", str(path), stdin=key, check=False
    )
    return result.returncode == 0


def uuid_of(path: Path) -> str:
    return cryptsetup("luksUUID", str(path)).stdout.decode().strip()


def metadata(path: Path) -> dict:
    """The LUKS2 JSON area as cryptsetup dumps it."""
    return json.loads(cryptsetup("luksDump", "--dump-json-metadata", str(path)).stdout)


def dump_volume_key(path: Path, passphrase: bytes) -> bytes:
    """The volume key as ``cryptsetup luksDump --dump-volume-key`` prints it."""
    out = cryptsetup(
        "luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-", str(path),
        stdin=passphrase,
    ).stdout.decode()
    block = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", block)))


def import_token(path: Path | str, token_json: bytes) -> None:
    """``cryptsetup token import``: the token text exactly as given (it assigns its keyslots)."""
    cryptsetup("token", "import", "--json-file=-", str(path), stdin=token_json)


def export_token(path: Path | str, token: int) -> bytes:
    """``cryptsetup token export``: a token's JSON as cryptsetup writes it out."""
    return cryptsetup("token", "export", "--token-id", str(token), str(path)).stdout


def kill_slot(path: Path | str, keyslot: int, passphrase: bytes) -> None:
    """``cryptsetup luksKillSlot``, proving the right with another keyslot's passphrase."""
    cryptsetup("luksKillSlot", "--batch-mode", "--key-file=-", str(path), str(keyslot),
               stdin=passphrase)


@contextlib.contextmanager
def loop_device(path: Path, *, read_only: bool = False) -> Iterator[str]:
    """``path`` attached to a free loop device (a real block device) for the block."""
    binary = require_binary("losetup", "apt-get install mount")
    require(
        os.geteuid() == 0 and Path("/dev/loop-control").exists(),
        "root with loop devices",
        "run the tests as root on a kernel with CONFIG_BLK_DEV_LOOP",
    )
    mode = ("--read-only",) if read_only else ()
    node = subprocess.run([binary, "--find", "--show", *mode, str(path)], capture_output=True,
                          check=True, text=True).stdout.strip()
    try:
        yield node
    finally:
        subprocess.run([binary, "--detach", node], capture_output=True, check=False)


@pytest.fixture
def person() -> bytes:
    """The passphrase a person typed for :func:`image`'s keyslot 0."""
    return make("person")


@pytest.fixture
def image(tmp_path: Path, person: bytes) -> Path:
    """A fresh LUKS2 image file (fast PBKDF2), keyslot 0 opened by ``person``."""
    return format_image(tmp_path / "luks2.img", person)
