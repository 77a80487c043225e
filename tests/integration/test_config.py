"""The configuration through the real command: ``keyhandoff config``, ``--config``, and a typo
that must never keep a boot step from destroying a one-time keyslot.

The boot steps run as the units run them (``python -m keyhandoff finish``...) in a private
mount namespace whose /etc is an overlay holding a broken keyhandoff.conf, a drop-in that is
not UTF-8 and a crypttab naming a real LUKS2 image with a stale one-time keyslot; its
/run/keyhandoff is a private tmpfs (the once-per-boot markers).  The machine's /etc is not
touched.  Logs go to stderr (``KEYHANDOFF_LOG=stderr``), libefivar to a scratch directory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.luks_images import format_image, opens
from support.parts import require_binary
from support.passphrases import make
from support.scratch_efi import scratch_efivars, scratch_env

from keyhandoff import onetime
from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator

ADMIN = "etc/keyhandoff/keyhandoff.conf"
ETC_D = "etc/keyhandoff/keyhandoff.conf.d"


def kh(*args: object, prefix: list[str] | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*(prefix or []), sys.executable, "-m", "keyhandoff", *map(str, args)],
                          capture_output=True, timeout=180, check=False, env=env)
    out = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                      proc.stderr.decode(errors="replace"))
    assert "Traceback" not in out.stderr, out.stderr
    return out


def put(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- a typo never keeps a one-time keyslot alive --------------------------------------------

BROKEN_ADMIN = '[login]\ntimeout = "2min"\nenabled = tru\n'  # not TOML: line 3
BROKEN_DROPIN = b'[capture]\nretain = 60\nwait_for_update = "\xff"\n'  # not UTF-8: line 3
BAD_VALUE = '[login]\ntimeout = "2min"\n[update]\nauto_arm = 1\n'  # two wrong types


@contextlib.contextmanager
def broken_etc(image: Path, admin: str, tmp_path: Path) -> Iterator[list[str]]:
    """A mount namespace whose /etc has a broken configuration and ``image`` in crypttab."""
    with tempfile.TemporaryDirectory(prefix="kh-conf-etc-") as d:
        upper, work = Path(d, "upper"), Path(d, "work")
        work.mkdir()
        put(upper, "keyhandoff/keyhandoff.conf", admin)
        put(upper, "keyhandoff/keyhandoff.conf.d/50-bad.conf", BROKEN_DROPIN)
        put(upper, "crypttab", f"khconf {image} none luks\n")
        unshare = require_binary("unshare", "apt-get install util-linux")
        script = ("mkdir -p -m 0700 /run/keyhandoff && "
                  "mount -t tmpfs -o mode=0700 keyhandoff-test /run/keyhandoff && "
                  f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} "
                  '/etc && exec "$@"')
        yield [unshare, "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def stale_onetime(img: Path, passphrase: bytes) -> int:
    """A genuine one-time keyslot armed in another boot (as ``arm`` makes it): stale now."""
    with LuksHeader.open(img) as header:
        _slot, vk = header.volume_key(Secret.passphrase(passphrase))
        with vk, Secret(bytearray(os.urandom(32))) as record_key:
            slot, key = onetime.add(header, vk, not_after=int(time.time()) + 600,
                                    boot_id=str(uuid.uuid4()), record_key=record_key)
        key.wipe()
    return slot.keyslot


def onetime_keyslots(img: Path) -> list[int]:
    with LuksHeader.open(img) as header:
        return [s.keyslot for s in onetime.slots(header)]


@pytest.mark.parametrize("admin", [BROKEN_ADMIN, BAD_VALUE], ids=["not-toml", "bad-values"])
@pytest.mark.parametrize("step", ["finish", "restore"])
def test_a_broken_config_never_stops_a_boot_step_destroying_onetime_keyslots(
        tmp_path, step, admin):
    person = make("conf-boot")
    img = format_image(tmp_path / "v.img", person)
    keyslot = stale_onetime(img, person)
    assert onetime_keyslots(img) == [keyslot]
    env = scratch_env(scratch_efivars(tmp_path))

    with broken_etc(img, admin, tmp_path) as ns:
        r = kh(step, prefix=ns, env=env)

    assert r.returncode == 0, r.stderr
    assert onetime_keyslots(img) == []  # destroyed, whatever the configuration says
    assert opens(img, person, keyslot=0)  # the person's keyslot is untouched
    if step == "finish":  # the step that reads the configuration says what it left out
        dropin = "/etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:3: not valid UTF-8"
        assert f"configuration error: {dropin}" in r.stderr
        if admin == BROKEN_ADMIN:
            assert ("configuration error: /etc/keyhandoff/keyhandoff.conf:3: not valid TOML"
                    in r.stderr)
        else:
            assert ("/etc/keyhandoff/keyhandoff.conf:2: login.timeout must be int, not a "
                    "string: the setting is left out; finish goes on without it" in r.stderr)
            assert "/etc/keyhandoff/keyhandoff.conf:4: update.auto_arm must be bool" in r.stderr


@pytest.mark.parametrize("step", ["capture-initrd", "schedule"])
def test_the_other_boot_steps_log_the_error_and_go_on(tmp_path, step):
    person = make("conf-steps")
    img = format_image(tmp_path / "v.img", person)
    env = scratch_env(scratch_efivars(tmp_path))
    with broken_etc(img, BAD_VALUE, tmp_path) as ns:
        r = kh(step, prefix=ns, env=env)
    assert r.returncode == 0, r.stderr
    assert (f"/etc/keyhandoff/keyhandoff.conf:4: update.auto_arm must be bool, not an "
            f"integer: the setting is left out; {step} goes on without it") in r.stderr
    assert "/etc/keyhandoff/keyhandoff.conf.d/50-bad.conf:3: not valid UTF-8" in r.stderr
