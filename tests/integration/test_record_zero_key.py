"""Issue 10, finding 1, end to end: ``keyhandoff arm --reboot full --login`` on a scratch
efivarfs, then the EFI variable is attacked the way the review did.

With cryptography 38 (Debian 12's python3-cryptography) keyhandoff used to seal the record
and the login passphrase in it under 32 zero bytes: ``ChaCha20Poly1305(bytes(32))`` on the
variable gave the one-time key and, with the same zero key, the person's passphrase, from
NVRAM alone.  Here the real command (the interpreter and packages this suite runs on: the
venv in one CI pass, Debian's own stack in the other) arms a real LUKS2 image; then

* the zero key opens neither the record nor the sealed passphrase, and
* an independent derivation (tests/support/record_keys.py) opens the record with the record key
  from the LUKS2 token and the sealed passphrase with the volume key from
  ``cryptsetup luksDump --dump-volume-key``: the format is what the documentation says.
"""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
from cryptography.exceptions import InvalidTag
from support import record_keys
from support.luks_images import dump_volume_key, format_image, metadata, opens, uuid_of
from support.passphrases import make
from support.scratch_efi import scratch_env

from keyhandoff import efi

STASH_FILE = f"{efi.RECORD_NAME}-{efi.VENDOR_GUID}"


def kh(env, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([sys.executable, "-m", "keyhandoff", *args], input=stdin, env=env,
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 0, (args, proc.stderr.decode(errors="replace")[-2000:])
    return proc


def test_armed_record_and_login_passphrase_do_not_open_under_a_zero_key(tmp_path, cache,
                                                                          efivars):
    pw = make("zero-key")
    img = format_image(tmp_path / "v.img", pw)
    volume = uuid_of(img)
    env = scratch_env(efivars)
    kh(env, "cache", "put", "--volume", volume, "--timeout", "120", stdin=pw + b"\n")
    try:
        kh(env, "arm", "--reboot", "full", "--login", "--volume", str(img), "--no-ask")
        raw = (efivars / STASH_FILE).read_bytes()
        blob = raw[4:]  # efivarfs: 4 bytes of attributes, then the data
        assert pw not in raw

        with pytest.raises(InvalidTag):
            record_keys.open_record_with(record_keys.ZERO_KEY, blob)

        tokens = [t for t in metadata(img)["tokens"].values()
                  if t["type"] == "keyhandoff-onetime"]
        assert len(tokens) == 1
        record_key = base64.b64decode(tokens[0]["record_key"])
        assert blob[39:47] == record_keys.record_key_id(record_key)
        plaintext = record_keys.open_record_with(record_keys.record_aead_key(record_key), blob)
        entries = {kind: payload for _volume, kind, payload in record_keys.entries(plaintext)}
        assert sorted(entries) == [1, 2]
        assert opens(img, entries[1].hex().encode())  # the one-time key, as its keyslot wants

        sealed = entries[2]
        with pytest.raises(InvalidTag):
            record_keys.open_sealed_with(record_keys.ZERO_KEY, sealed)
        context = b"keyhandoff login:" + volume.encode()
        key = record_keys.sealed_key(dump_volume_key(img, pw), sealed, context)
        assert record_keys.open_sealed_with(key, sealed) == pw
    finally:
        kh(env, "disarm", "--volume", str(img))
        kh(env, "cache", "forget", "--all")
    assert not any(t["type"] == "keyhandoff-onetime" for t in metadata(img)["tokens"].values())
