"""Token plugin benchmark: one ``cryptsetup open --test-passphrase`` by token, against one by
the person's passphrase, on the same LUKS2 image file.

    python bench/bench_token.py [--runs 20] [--passphrase-runs 3] [--iter-time MS]

Builds the plugin (csrc/build-token) into a scratch directory and runs every open in a
private mount namespace where libcryptsetup's token directory is a bind mount of it (as
tests/integration/test_token_plugin.py does; the machine's plugin directory is never
touched).  Times are whole ``cryptsetup`` processes, wall clock, best of N, the same
namespace wrapper around both:

* ``token, from the EFI variable``: the first volume of a boot: read the variable, publish
  the keyring copy, delete the variable, open the record, answer the one-time keyslot
  (pbkdf2, 1000 iterations);
* ``token, from the keyring copy``: a further volume of the same record;
* ``passphrase``: the person's keyslot 0 (no token tried: ``--disable-external-tokens``),
  made with cryptsetup's default PBKDF (argon2id) and ``--iter-time`` (default:
  cryptsetup's own 2000 ms).

Needs root (mount namespace, root's @u keyring; the keyring copy is removed at the end).
"""

from __future__ import annotations

import argparse
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKEN_DIR = "/lib/x86_64-linux-gnu/cryptsetup"  # noqa: S105  # a directory
WRAP = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


def _cryptsetup(plugin_dir: Path, efivars: Path, *args: str, stdin: bytes = b"") -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", WRAP, "sh",
         str(plugin_dir), TOKEN_DIR, "cryptsetup", *args],
        input=stdin, capture_output=True, check=False,
        env={**os.environ, "EFIVARFS_PATH": f"{efivars}/"},
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cryptsetup {' '.join(args)} failed: {proc.stderr.decode()[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--passphrase-runs", type=int, default=3)
    parser.add_argument("--iter-time", type=int, default=None)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from keyhandoff import names, onetime, record  # noqa: PLC0415
    from keyhandoff.cache import PassphraseCache  # noqa: PLC0415
    from keyhandoff.luks import LuksHeader  # noqa: PLC0415
    from keyhandoff.secret import Secret  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="bench-token-") as scratch:
        base = Path(scratch)
        plugin_dir, efivars, image = base / "plugin", base / "efivars", base / "img"
        subprocess.run([str(REPO / "csrc" / "build-token"), str(plugin_dir)], check=True,
                       capture_output=True)
        efivars.mkdir()
        passphrase = b"bench-" + secrets.token_hex(8).encode()
        with image.open("wb") as f:
            f.truncate(32 * 1024 * 1024)
        iter_time = ("--iter-time", str(args.iter_time)) if args.iter_time else ()
        subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", *iter_time,
                        "--batch-mode", "--key-file=-", str(image)], input=passphrase,
                       check=True, capture_output=True)
        record_key = record.new_record_key()
        with LuksHeader.open(str(image)) as header:
            _slot, vk = header.volume_key(Secret.passphrase(passphrase))
            with vk, record_key.copy() as kept:
                _info, key = onetime.add(header, vk, not_after=int(time.time()) + 86400,
                                         boot_id=str(uuid.uuid4()), record_key=kept)
            volume = uuid.UUID(header.uuid)
        cache = PassphraseCache()
        token_args = ("open", "--test-passphrase", "--token-only", "--token-type",
                      names.TOKEN_TYPE, str(image))
        first: list[float] = []
        again: list[float] = []
        try:
            for _ in range(args.runs):
                now = int(time.time())
                handoff = record.HandoffRecord(
                    channel=record.RecordChannel.EFI, created=now, not_after=now + 3600,
                    boots_left=1, boot_id=uuid.uuid4(),
                    entries=(record.Entry(volume, record.EntryKind.ONETIME_KEY, key.copy()),))
                with handoff:
                    blob = record.seal(handoff, record_key)
                (efivars / f"{names.EFI_RECORD_NAME}-{names.EFI_VENDOR_GUID}").write_bytes(
                    struct.pack("<I", 7) + blob)
                cache.forget_key(names.RECORD_BLOB_KEY)
                first.append(_cryptsetup(plugin_dir, efivars, *token_args))
                again.append(_cryptsetup(plugin_dir, efivars, *token_args))
            by_passphrase = [
                _cryptsetup(plugin_dir, efivars, "open", "--test-passphrase", "--key-slot", "0",
                            "--disable-external-tokens", "--key-file=-", str(image),
                            stdin=passphrase)
                for _ in range(args.passphrase_runs)
            ]
        finally:
            cache.forget_key(names.RECORD_BLOB_KEY)
            key.wipe()
            record_key.wipe()
    print(f"token, from the EFI variable:  best {min(first) * 1000:7.1f} ms of {args.runs}")
    print(f"token, from the keyring copy:  best {min(again) * 1000:7.1f} ms of {args.runs}")
    print(f"passphrase (argon2id default): best {min(by_passphrase) * 1000:7.1f} ms of "
          f"{args.passphrase_runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
