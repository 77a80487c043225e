"""Capture of a passphrase typed in the initramfs, after the switch to the real root.

systemd-cryptsetup in the initramfs left what the person typed in root's @u ``cryptsetup``
key: here a real one written by SystemdCache exactly as systemd 252 writes it.  The entries
are checked against real LUKS2 images in the verifier child.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.luks_images import add_key, format_image, uuid_of
from support.parts import require_binary
from support.passphrases import make

from keyhandoff import initrd_capture, keyring, statelock
from keyhandoff.cache import SYSTEMD_PERM, PassphraseCache, SystemdCache
from keyhandoff.errors import KeyNotFound
from keyhandoff.host import Host
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def systemd_key() -> Iterator[SystemdCache]:
    """systemd's ``cryptsetup`` key in root's @u, as systemd-cryptsetup leaves it; removed."""
    sc = SystemdCache()
    sc.clear()
    yield sc
    sc.clear()


def typed(sc: SystemdCache, *passwords: bytes) -> None:
    """What the person typed in the initramfs, oldest first, as systemd 252 stores it."""
    assert sc.add([Secret.passphrase(p) for p in passwords])


def cached(cache: PassphraseCache, volume: str) -> bytes | None:
    try:
        with cache.get(volume) as s:
            return bytes(s.view())
    except KeyNotFound:
        return None


NO_CRYPTTAB = Host(crypttab_path="/nonexistent/crypttab")


def test_capture_attributes_each_entry_to_the_volumes_it_opens(tmp_path, cache, systemd_key):
    root_pw, data_pw = make("root"), make("data")
    root = format_image(tmp_path / "root.img", root_pw)
    data = format_image(tmp_path / "data.img", data_pw)
    home = format_image(tmp_path / "home.img", root_pw)  # one passphrase for two disks
    typed(systemd_key, data_pw, root_pw)
    report = initrd_capture.capture(retain=60, volumes=[str(root), str(data), str(home)],
                                    host=NO_CRYPTTAB)
    assert report.ran
    assert set(report.captured) == {uuid_of(root), uuid_of(data), uuid_of(home)}
    # root: data_pw refused, root_pw opens; data: data_pw opens; home: as root
    assert report.checks == 5
    assert report.checks <= 2 * 3  # at most one check per (entry, volume)
    assert cached(cache, uuid_of(root)) == root_pw
    assert cached(cache, uuid_of(data)) == data_pw
    assert cached(cache, uuid_of(home)) == root_pw
    # with the cache's timeout
    left = {e.volume: e.seconds_left for e in cache.entries()}
    assert all(s is not None and 0 < s <= 60 for s in left.values())
    # systemd's key is left as it was (pam_gdm reads it)
    assert [bytes(s.view()) for s in systemd_key.read()] == [data_pw, root_pw]


def test_capture_keeps_nothing_that_does_not_open(tmp_path, cache, systemd_key):
    vol = format_image(tmp_path / "v.img", make("right"))
    typed(systemd_key, make("wrong"))
    report = initrd_capture.capture(retain=60, volumes=[str(vol)], host=NO_CRYPTTAB)
    assert (report.captured, report.checks) == ((), 1)
    assert cached(cache, uuid_of(vol)) is None


def test_capture_never_keeps_a_one_time_key(tmp_path, cache, systemd_key):
    """The one-time key opens the volume, and still is not its passphrase: never checked."""
    pw, onetime = make("person"), make("onetime")
    vol = format_image(tmp_path / "v.img", pw)
    add_key(vol, pw, onetime)  # a keyslot the "one-time key" opens, as the real one does
    volume = uuid_of(vol)
    cache.put_onetime(volume, Secret.passphrase(onetime), timeout=60)  # restored this boot
    try:
        typed(systemd_key, onetime)
        report = initrd_capture.capture(retain=60, volumes=[str(vol)], host=NO_CRYPTTAB)
        assert (report.captured, report.onetime_skipped, report.checks) == ((), 1, 0)
        assert cached(cache, volume) is None
        # beside it, what the person typed for another volume is still captured
        other_pw = make("other")
        other = format_image(tmp_path / "o.img", other_pw)
        typed(systemd_key, other_pw)
        report = initrd_capture.capture(retain=60, volumes=[str(vol), str(other)],
                                        host=NO_CRYPTTAB)
        assert report.captured == (uuid_of(other),)
        assert report.onetime_skipped == 1
        assert report.checks == 2  # other_pw on vol (refused), on other (opens)
        assert cached(cache, volume) is None
    finally:
        cache.forget_onetime(volume)


def test_capture_skips_a_volume_already_cached(tmp_path, cache, systemd_key):
    pw = make("known")
    vol = format_image(tmp_path / "v.img", pw)
    cache.put(uuid_of(vol), Secret.passphrase(pw), timeout=60)
    typed(systemd_key, pw)
    report = initrd_capture.capture(retain=60, volumes=[str(vol)], host=NO_CRYPTTAB)
    assert (report.captured, report.checks) == ((), 0)


def test_capture_off_keeps_nothing(tmp_path, cache, systemd_key):
    pw = make("off")
    vol = format_image(tmp_path / "v.img", pw)
    typed(systemd_key, pw)
    report = initrd_capture.capture(retain=0, volumes=[str(vol)], host=NO_CRYPTTAB)
    assert (report.captured, report.checks) == ((), 0)
    assert cached(cache, uuid_of(vol)) is None


def test_capture_reads_crypttab_by_default(tmp_path, cache, systemd_key):
    pw = make("tab")
    vol = format_image(tmp_path / "v.img", pw)
    tab = tmp_path / "crypttab"
    tab.write_text(f"cryptroot {vol} none luks\n")
    typed(systemd_key, pw)
    report = initrd_capture.capture(retain=60, host=Host(crypttab_path=str(tab)))
    assert uuid_of(vol) in report.captured
    assert cached(cache, uuid_of(vol)) == pw


def test_capture_runs_once_per_boot(tmp_path, cache, systemd_key, monkeypatch):
    lock_dir = tmp_path / "run"  # not the machine's /run/keyhandoff: no mark left there
    lock_dir.mkdir(mode=0o700)
    monkeypatch.setattr(statelock, "LOCK_DIR", str(lock_dir))
    pw = make("once")
    vol = format_image(tmp_path / "v.img", pw)
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(str(uuid.uuid4()))
    host = Host(boot_id_path=str(boot_id), crypttab_path="/nonexistent/crypttab")
    typed(systemd_key, pw)
    first = initrd_capture.capture_once(retain=60, volumes=[str(vol)], host=host)
    assert (first.ran, first.captured) == (True, (uuid_of(vol),))
    cache.forget(uuid_of(vol))
    again = initrd_capture.capture_once(retain=60, volumes=[str(vol)], host=host)
    assert (again.ran, again.captured, again.checks) == (False, (), 0)
    assert cached(cache, uuid_of(vol)) is None
    boot_id.write_text(str(uuid.uuid4()))  # the next boot captures again
    assert initrd_capture.capture_once(retain=60, volumes=[str(vol)], host=host).ran
    assert (lock_dir / "done-capture-initrd").read_text().strip() == boot_id.read_text()


_TRACED = "trace=prctl,mlockall,keyctl"


def test_the_command_hardens_itself_and_captures_once(tmp_path, cache, systemd_key):
    """``keyhandoff capture-initrd`` as its unit runs it, in a mount namespace whose
    /run/keyhandoff is a private tmpfs (the once-per-boot mark of the real boot id stays
    there); non-dumpable and memory-locked before it reads a key."""
    pw = make("cli")
    vol = format_image(tmp_path / "v.img", pw)
    typed(systemd_key, pw)
    unshare = require_binary("unshare", "apt-get install util-linux")
    strace = require_binary("strace", "apt-get install strace")
    log = tmp_path / "strace.log"
    kh = f"{sys.executable} -m keyhandoff capture-initrd --volume {vol}"
    script = ("mkdir -p -m 0700 /run/keyhandoff && "
              "mount -t tmpfs -o mode=0700 keyhandoff-test /run/keyhandoff && "
              f"{strace} -f -qq -s 0 -e {_TRACED} -o {log} {kh} && {kh}")
    proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-2].startswith("keyhandoff: kept the passphrase typed in the initramfs for 1 ")
    assert lines[-1] == "keyhandoff: the initramfs capture ran already in this boot"
    assert cached(cache, uuid_of(vol)) == pw
    calls = log.read_text().splitlines()
    dump = next(i for i, c in enumerate(calls) if "PR_SET_DUMPABLE, SUID_DUMP_DISABLE" in c)
    lock = next(i for i, c in enumerate(calls) if c.split()[1].startswith("mlockall("))
    read = next(i for i, c in enumerate(calls) if "KEYCTL_READ" in c)
    assert dump < read
    assert lock < read


SCRIPTS = Path(__file__).resolve().parents[2] / "initramfs/initramfs-tools/scripts"
# the same step twice: once the root is unlocked (local-premount, 150 s), and before the
# switch (local-bottom, 300 s), with the timeout /proc/keys shows just after each
TIMEOUT_SCRIPTS = ["local-premount", "local-bottom"]
SHOWN_AFTER = {"local-premount": {"2m"},        # 120-179 s: 150 s
               "local-bottom": {"4m", "5m"}}     # 240-300 s: 300 s


def timeout_of(serial: int) -> str:
    """The key's timeout as /proc/keys shows it (``59s``, ``2m``, ``perm``), or ``gone``."""
    return next((info.expiry for info in keyring.proc_keys({serial})), "gone")


def run_script(where: str, env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["/bin/sh", str(SCRIPTS / where / "keyhandoff")], capture_output=True,
                          check=False, env=env, timeout=30)


@pytest.mark.parametrize("where", TIMEOUT_SCRIPTS)
def test_decrypt_keyctl_entry_outlasts_a_slow_switch_and_is_captured(
    where, tmp_path, cache, systemd_key,
):
    """initramfs-tools: what decrypt_keyctl kept is given 150 s (local-premount), 300 s
    (local-bottom), then captured.

    Debian's decrypt_keyctl (``keyscript=decrypt_keyctl``) stores what was typed as it is
    done here, with the real keyctl: ``printf %s "$KEY_" | keyctl padd user cryptsetup @u``
    and ``keyctl timeout 60``: one entry, no NUL.  Each of our two scripts sets the timeout
    (systemd's 150 s once unlocked, 300 s at the switch) and prints nothing; capture reads
    the entry like systemd's.
    """
    keyctl = require_binary("keyctl", "apt-get install keyutils")
    pw = make("keyctl")
    vol = format_image(tmp_path / "v.img", pw)
    added = subprocess.run([keyctl, "padd", "user", "cryptsetup", "@u"], input=pw,
                           capture_output=True, check=True, timeout=30)
    serial = int(added.stdout)
    subprocess.run([keyctl, "timeout", str(serial), "60"], check=True, timeout=30)
    assert timeout_of(serial) in {"59s", "1m"}
    done = run_script(where)
    assert (done.returncode, done.stdout + done.stderr) == (0, b"")
    assert timeout_of(serial) in SHOWN_AFTER[where]
    report = initrd_capture.capture(retain=60, volumes=[str(vol)], host=NO_CRYPTTAB)
    assert report.captured == (uuid_of(vol),)
    assert cached(cache, uuid_of(vol)) == pw


@pytest.mark.parametrize("where", TIMEOUT_SCRIPTS)
def test_the_timeout_scripts_do_nothing_without_the_key_or_keyctl(where, systemd_key):
    done = run_script(where)
    assert (done.returncode, done.stdout + done.stderr) == (0, b"")
    assert systemd_key.read() == []
    typed(systemd_key, make("typed"))
    serial = keyring.find_trusted("user", "cryptsetup", perm=SYSTEMD_PERM, within=keyring.USER)
    before = timeout_of(serial)
    done = run_script(where, env={"PATH": "/nonexistent"})  # an image without keyctl
    assert (done.returncode, done.stdout + done.stderr) == (0, b"")
    assert timeout_of(serial) == before
