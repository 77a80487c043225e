"""Arm cost per volume: keyhandoff's one-time keyslot against ``cryptsetup luksAddKey``.

Arming one volume = ``volume_key()`` (one PBKDF of the person's keyslot) +
``add_onetime_keyslot()`` (cheap pbkdf2 for a random key) + a token.  ``luksAddKey`` on the
same image opens the existing slot (same PBKDF) and derives the new slot's key.  The
person's slot uses argon2id with bounded cost (4 iterations, 64 MiB) so a run is short.

Compared against luksAddKey twice: with the same cheap new-slot PBKDF (the same work, so
the ratio shows our overhead) and with the new slot as costly as the person's (what a
second passphrase would cost).  Target: ours <= 1.2x the first.

Usage: .venv/bin/python bench/bench_arm.py [runs]   (root not needed; no dm-crypt needed)
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from keyhandoff.luks import LuksHeader
from keyhandoff.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Callable

PERSON_PBKDF = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "65536")
CHEAP_PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
CRYPTSETUP = shutil.which("cryptsetup") or sys.exit(
    "cryptsetup missing: apt-get install cryptsetup-bin"
)


def format_image(path: Path, passphrase: bytes) -> None:
    with path.open("wb") as f:
        f.truncate(20 * 1024 * 1024)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "--type", "luks2", *PERSON_PBKDF, "--batch-mode",
         "--key-file=-", str(path)],
        input=passphrase, check=True, capture_output=True,
    )


def arm_ours(path: Path, passphrase: Secret) -> int:
    with LuksHeader.open(path) as header:
        _, volume_key = header.volume_key(passphrase, keyslot=0)
        with volume_key, Secret(secrets.token_bytes(32)) as key:
            slot = header.add_onetime_keyslot(volume_key, key)
        token = header.set_token({"type": "keyhandoff-onetime", "keyslots": [], "not_after": 0})
        header.assign_token(token, slot)
    return slot


def verify(path: Path, passphrase: Secret) -> None:
    with LuksHeader.open(path) as header:
        header.verify(passphrase, keyslot=0)


def luks_add_key(path: Path, passphrase: bytes, new_slot_pbkdf: tuple[str, ...]) -> None:
    # The new key comes from a pipe (/dev/fd/N), the existing passphrase from stdin: no
    # secret in argv.
    r, w = os.pipe()
    os.write(w, secrets.token_hex(16).encode())
    os.close(w)
    try:
        subprocess.run(
            [CRYPTSETUP, "luksAddKey", *new_slot_pbkdf, "--key-slot", "1", "--batch-mode",
             "--key-file=-", str(path), f"/dev/fd/{r}"],
            input=passphrase, check=True, capture_output=True, pass_fds=(r,),
        )
    finally:
        os.close(r)


def reset(path: Path) -> None:
    """Back to the person's slot only (not timed)."""
    with LuksHeader.open(path) as header:
        for token in header.tokens:
            header.remove_token(token)
        for slot in header.keyslots:
            if slot != 0:
                header.destroy_keyslot(slot)


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    passphrase = b"bench-" + secrets.token_hex(8).encode()
    ours, same_work, costly, one_pbkdf = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "bench.img"
        format_image(image, passphrase)
        for _ in range(runs):  # interleaved, so drift hits all three alike
            with Secret.passphrase(passphrase) as secret:
                one_pbkdf.append(timed(verify, image, secret))
                ours.append(timed(arm_ours, image, secret))
            reset(image)
            same_work.append(timed(luks_add_key, image, passphrase, CHEAP_PBKDF))
            reset(image)
            costly.append(timed(luks_add_key, image, passphrase, PERSON_PBKDF))
            reset(image)
    p50 = statistics.median
    rows = [
        ("keyhandoff verify (one PBKDF of the person's slot)", one_pbkdf),
        ("keyhandoff arm (volume_key + onetime keyslot + token)", ours),
        ("cryptsetup luksAddKey, new slot pbkdf2/1000", same_work),
        ("cryptsetup luksAddKey, new slot argon2id t=4 m=64MiB", costly),
    ]
    print(f"runs: {runs}; person keyslot argon2id t=4 m=64MiB (threads: libcryptsetup default)")
    for label, times in rows:
        print(f"{label:<55} p50 {p50(times) * 1000:8.1f} ms")
    ratio = p50(ours) / p50(same_work)
    print(f"ratio ours / luksAddKey (same new slot): {ratio:.2f}x (target <= 1.2x)")
    print(f"ratio ours / luksAddKey (costly new slot): {p50(ours) / p50(costly):.2f}x")
    print(f"ratio ours / one PBKDF: {p50(ours) / p50(one_pbkdf):.2f}x")
    # cryptsetup 2.6.1's luksAddKey derives the existing slot's key twice (it checks the
    # passphrase, then crypt_keyslot_add_by_passphrase opens the slot again): see --debug.


if __name__ == "__main__":
    main()
