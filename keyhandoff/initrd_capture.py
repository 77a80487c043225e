"""Capture of what the person typed in the initramfs, once, after the switch to the real root.

In the initramfs keyhandoff's agent does not run: systemd-cryptsetup asks, and pushes what
was typed into root's ``@u`` ``cryptsetup`` key (:class:`~keyhandoff.cache.SystemdCache`,
150 s), which survives the switch.  :func:`capture` attributes those entries to volumes and
keeps each as that volume's passphrase, as the agent keeps what was typed at its prompts:

* the candidate volumes are the prompting crypttab entries and every LUKS device of the
  machine (:func:`keyhandoff.luks_scan.luks_paths`); nothing says which of them the
  initramfs opened, so a candidate is whatever holds a LUKS header;
* an entry equal to a restored one-time key (``keyhandoff:onetime:*``: the one-time key of
  a volume, from this boot's record) is never kept as a passphrase: it is skipped before
  any check;
* each remaining entry is checked against each volume that has no cached passphrase yet,
  in the agent's hardened verifier child (:mod:`keyhandoff.verifier`): at most one check
  per (entry, volume) pair, one child at a time; the first entry that opens a volume is
  cached for it (:meth:`~keyhandoff.cache.PassphraseCache.put`, with the agent's
  ``capture.retain`` timeout) and no further entry is tried on that volume.  One entry
  that opens several volumes (one passphrase for all disks) is cached for each.

``keyhandoff capture-initrd`` runs it from ``keyhandoff-capture-initrd.service``, after
``keyhandoff-restore.service`` (whose one-time keys it must see) and before
``cryptsetup-pre.target`` (the agent answers the real root's prompts from what it keeps).
Once per boot (:func:`keyhandoff.update.first_in_boot`): a restarted unit checks nothing
again.  Nothing typed is ever logged; the journal says which volumes got a passphrase.
"""

from __future__ import annotations

import contextlib
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keyhandoff import journal, luks_scan, verifier
from keyhandoff.cache import PassphraseCache, SystemdCache
from keyhandoff.errors import KeyhandoffError, KeyUnavailable
from keyhandoff.host import THIS_HOST, Host
from keyhandoff.journal import Event
from keyhandoff.verifier import Verdict
from keyhandoff.volumes import resolve_source

if TYPE_CHECKING:
    from collections.abc import Sequence

    from keyhandoff.secret import Secret

__all__ = ["STEP", "CaptureReport", "capture", "capture_once"]

#: The per-boot step name (:func:`keyhandoff.update.first_in_boot`).
STEP = "capture-initrd"


@dataclass(frozen=True, slots=True)
class CaptureReport:
    """What one capture did (no secret): volumes now cached, entries skipped, checks run."""

    ran: bool
    captured: tuple[str, ...] = ()
    onetime_skipped: int = 0
    checks: int = 0

    def summary(self) -> str:
        """In words, for the unit's log."""
        if not self.ran:
            return "the initramfs capture ran already in this boot"
        return (f"kept the passphrase typed in the initramfs for {len(self.captured)} "
                f"volume(s) ({self.checks} check(s); {self.onetime_skipped} one-time key(s) "
                "skipped)")


def _candidates(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, UUID) of each LUKS volume at ``paths``, one path per volume."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in luks_scan.unique_paths(paths):
        try:
            volume = resolve_source(path, require_header=True)
        except (KeyhandoffError, OSError, ValueError):
            continue  # gone, not LUKS, unreadable: nothing typed can be for it
        if volume not in seen:
            seen.add(volume)
            out.append((path, volume))
    return out


def _onetime_keys(cache: PassphraseCache) -> list[Secret]:
    """Every one-time key restored in this boot (never to be kept as a passphrase)."""
    keys = []
    for entry in cache.onetime_entries():
        with contextlib.suppress(KeyUnavailable):
            keys.append(cache.get_onetime(entry.volume))
    return keys


def _verify(path: str, volume: str, candidate: Secret) -> Verdict:
    """One check in the verifier child, waited for up to its deadline (then killed)."""
    try:
        check = verifier.start(path, volume, candidate)
    except (OSError, ValueError):
        return Verdict.FAILED
    while True:
        left = check.deadline - time.monotonic()
        if left <= 0:
            check.kill()
            check.result()
            return Verdict.FAILED
        readable, _w, _x = select.select([check], [], [], left)
        if readable:
            return check.result()


def capture(*, retain: int, volumes: Sequence[str] | None = None,
            cache: PassphraseCache | None = None, systemd: SystemdCache | None = None,
            host: Host = THIS_HOST) -> CaptureReport:
    """Attribute systemd's ``cryptsetup`` entries to volumes and cache them (see module doc).

    ``volumes``: the candidate paths (default: the prompting crypttab entries of ``host``
    and every LUKS device).  ``retain``: the cache timeout in seconds; 0 keeps nothing (the
    agent's setting: capture is off).  The entries stay in systemd's key (pam_gdm reads it).
    """
    cache = cache if cache is not None else PassphraseCache()
    systemd = systemd if systemd is not None else SystemdCache()
    if retain <= 0:
        return CaptureReport(ran=True)
    entries = systemd.read()
    onetime = _onetime_keys(cache) if entries else []
    try:
        typed = [e for e in entries if not any(e == k for k in onetime)]
        skipped = len(entries) - len(typed)
        if skipped:
            journal.log(Event.NOT_CAPTURED, f"{skipped} entry(ies) systemd cached in the "
                        "initramfs are one-time keys; not kept as passphrases",
                        reason="one-time key")
        if not typed:
            return CaptureReport(ran=True, onetime_skipped=skipped)
        if volumes is None:
            listed = [e.source_path for e in host.crypttab() if e.prompts]
            paths = luks_scan.luks_paths(listed)
        else:
            paths = list(volumes)
        captured, checks = _attribute(cache, typed, _candidates(paths), retain)
    finally:
        for secret in (*entries, *onetime):
            secret.wipe()
    return CaptureReport(ran=True, captured=captured, onetime_skipped=skipped, checks=checks)


def _attribute(cache: PassphraseCache, typed: list[Secret],
               candidates: list[tuple[str, str]], retain: int) -> tuple[tuple[str, ...], int]:
    """Cache for each volume the first entry that opens it; (volumes cached, checks run)."""
    have = {e.volume for e in cache.entries()}
    captured: list[str] = []
    checks = 0
    for path, volume in candidates:
        if volume in have:
            continue  # already cached (and verified when it was): nothing to attribute
        for entry in typed:
            checks += 1
            if _verify(path, volume, entry) is Verdict.OPENS:
                cache.put(volume, entry, timeout=retain)
                captured.append(volume)
                journal.log(Event.CAPTURED, f"kept the passphrase typed in the initramfs "
                            f"for {volume} for {retain} s", volume=volume, retain=retain)
                break
    return tuple(captured), checks


def capture_once(*, retain: int, volumes: Sequence[str] | None = None,
                 host: Host = THIS_HOST) -> CaptureReport:
    """:func:`capture`, unless it ran in this boot already (then ``ran`` is False)."""
    from keyhandoff import update  # noqa: PLC0415  # the runner API, only for the boot mark

    if not update.first_in_boot(STEP, host=host):
        return CaptureReport(ran=False)
    return capture(retain=retain, volumes=volumes, host=host)
