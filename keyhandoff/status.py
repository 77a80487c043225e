"""``keyhandoff status``: what the machine offers and what keyhandoff holds.

Reports descriptions, states and expiry only, never a payload.  Each probe is independent:
one that fails reports its error and the others still run.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyhandoff import names, timefmt

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["StatusReport", "collect"]


@dataclass
class StatusReport:
    """The probe results, as sections of plain values."""

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return self.sections

    def as_text(self) -> str:
        """Human-readable form."""
        lines = []
        for name, values in self.sections.items():
            lines.append(f"{name}:")
            if not values:
                lines.append("  none")
            for key, value in values.items():
                lines.append(f"  {key}: {_text(value, key)}")
        return "\n".join(lines) + "\n"


#: keys whose integer values are Unix times, seconds left, or spans: shown as systemd does
_TIMES: dict[str, Callable[[int], str]] = {
    "deadline": timefmt.timestamp, "at": timefmt.timestamp, "seconds_left": timefmt.left,
    "capture_timeout": timefmt.span,
}


def _text(value: object, key: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and key in _TIMES:
        return _TIMES[key](value)
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return " ".join(f"{k}={_text(v, k)}" for k, v in value.items())
    return "none" if value is None else str(value)


def _keyring_section() -> dict[str, Any]:
    from keyhandoff import keyring  # lazy: status must work without it
    from keyhandoff.cache import PassphraseCache, SystemdCache

    out: dict[str, Any] = {}
    try:
        keyring.get_keyring_id(keyring.USER, create=True)
        out["usable"] = True
    except OSError as exc:
        return {"usable": False, "error": exc.strerror or str(exc)}
    user = keyring.get_keyring_id(keyring.USER)
    session_links = set()
    with contextlib.suppress(OSError):
        session_links = set(keyring.list_keyring(keyring.get_keyring_id(keyring.SESSION)))
    out["user_keyring_possessed"] = user in session_links
    try:
        entries = PassphraseCache().entries()
        out["cached_volumes"] = [e.as_dict() for e in entries]
    except OSError as exc:
        out["cached_volumes"] = f"unreadable: {exc.strerror}"
    # only root's own key in @u, with systemd's permissions, and only while it is usable
    systemd = SystemdCache().info()
    out["systemd_cryptsetup_key"] = (
        None if systemd is None
        else {"serial": systemd.serial, "seconds_left": systemd.seconds_left}
    )
    return out


def _systemd_section() -> dict[str, Any]:
    out: dict[str, Any] = {"running": os.path.isdir("/run/systemd/system")}
    exe = shutil.which("systemctl")
    version = None
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            first = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=5, check=False,
            ).stdout.split("\n", 1)[0]
            m = re.match(r"systemd (\d+)", first)
            version = int(m.group(1)) if m else None
    out["version"] = version
    out["soft_reboot"] = version is not None and version >= 254
    out["ask_password_dir"] = os.path.isdir(names.ASK_DIR)
    return out


def _handoff_section() -> dict[str, Any]:
    from keyhandoff import update

    return update.status()


def _schedule_section() -> dict[str, Any]:
    from keyhandoff import schedule

    return schedule.status()


def _channels_section() -> dict[str, Any]:
    from keyhandoff import update

    return update.channel_availability()


def _efi_section() -> dict[str, Any]:
    # Reads only: efi.probe() would write NVRAM (flash wear) and is for arming, not status.
    from keyhandoff import efi

    if not efi.supported():
        return {"runtime_variables": False}
    return {"runtime_variables": True, "record_present": efi.RECORD_VARIABLE.exists()}


def _kexec_section(root: str = "/") -> dict[str, Any]:
    # Reads files only: a probe load would use up one of kexec_load_limit_reboot.
    from keyhandoff import kexec
    from keyhandoff.errors import KexecError

    st = kexec.state(root=root)
    out: dict[str, Any] = {"possible": st.possible, "reason": st.reason or None,
                           "needs_signed_kernel": st.needs_signed_kernel, "loaded": st.loaded,
                           "loaded_by_keyhandoff": st.loaded and os.path.exists(
                               os.path.join(root, names.KEXEC_LOADED_MARK.lstrip("/")))}
    if not st.possible:
        out["next_kernel"] = None
        return out
    try:
        nxt = kexec.next_kernel(root=root)
    except KexecError as exc:
        out["next_kernel"] = None
        out["next_kernel_problem"] = str(exc)
        return out
    # not the command line: it is the running one's, and may carry what a status need not show
    out["next_kernel"] = {"release": nxt.release, "kernel": nxt.kernel, "initrd": nxt.initrd}
    return out


def _volumes_section() -> dict[str, Any]:
    from keyhandoff import crypttab, onetime
    from keyhandoff.luks import LuksHeader

    out: dict[str, Any] = {}
    for entry in crypttab.read():
        try:
            with LuksHeader.open(entry.luks_path) as header:
                out[entry.name] = {
                    "uuid": header.uuid, "luks": header.luks_version,
                    "keyslots": header.keyslots, "onetime_keyslots": len(onetime.slots(header)),
                }
        except OSError as exc:
            out[entry.name] = {"source": entry.source, "error": exc.strerror or str(exc)}
    return out


SECTIONS: dict[str, Any] = {
    "keyring": _keyring_section,
    "systemd": _systemd_section,
    "handoff": _handoff_section,
    "schedule": _schedule_section,
    "channels": _channels_section,
    "efi": _efi_section,
    "kexec": _kexec_section,
    "volumes": _volumes_section,
}


def collect() -> StatusReport:
    """Run every probe."""
    report = StatusReport()
    for name, probe in SECTIONS.items():
        try:
            report.sections[name] = probe()
        except Exception as exc:  # noqa: BLE001  # one broken probe must not hide the others
            report.sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return report
