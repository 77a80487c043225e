"""Structured, secret-free logging with a stable MESSAGE_ID per event.

Every event keyhandoff reports goes through :func:`log`.  Fields are explicit keyword
arguments of type ``str``/``int``; there is no ``%``-style argument list that could carry a
passphrase into the persistent journal (a ``Secret`` refuses to be formatted, so a mistake
raises instead of leaking).  When no journal socket exists (a container, a test) entries
go to stderr as ``keyhandoff: EVENT message key=value``.
"""

from __future__ import annotations

import enum
import os
import sys
from typing import Final

__all__ = ["Event", "log"]

_JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"


class Event(enum.Enum):
    """Events and their MESSAGE_IDs (``journalctl MESSAGE_ID=...`` finds each)."""

    STARTED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a701"
    STOPPING = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a702"
    NOTIFY_DROPPED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a703"
    CAPTURED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a710"
    NOT_CAPTURED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a711"
    ANSWERED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a720"
    REFUSED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a721"
    IGNORED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a722"
    DROPPED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a723"
    RETRY = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a724"
    KEPT = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a725"
    EXPIRED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a730"
    WIPED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a731"
    ARMED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a740"
    RESTORED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a741"
    RECORD_REFUSED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a742"
    #: an offline update is scheduled and nothing is captured: the boots will ask as usual
    NOTHING_CAPTURED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a743"
    #: the scheduled update was cancelled: the automatic arming of this boot is undone
    SCHEDULE_CANCELLED = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a744"
    #: what ``keyhandoff schedule`` decided otherwise (left alone, refused, an update boot)
    SCHEDULE = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a745"
    LOGIN_HANDOFF = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a750"
    #: a warning or error in a configuration file (its FILE and LINE are fields)
    CONFIG = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a760"
    ERROR = "4b7d2a0c1f3e4e6b9a51c1f0d6e2a7ff"


# syslog priorities
INFO: Final = 6
NOTICE: Final = 5
WARNING: Final = 4
ERR: Final = 3

_use_journal: bool | None = None


def _journal_available() -> bool:
    global _use_journal  # noqa: PLW0603  # decided once per process
    if _use_journal is None:
        _use_journal = os.path.exists(_JOURNAL_SOCKET) and os.environ.get(
            "KEYHANDOFF_LOG", "",
        ) != "stderr"
    return _use_journal


def log(event: Event, message: str, *, priority: int = INFO, **fields: str | int) -> None:
    """Send one entry: ``message`` plus ``fields`` as upper-case journal fields."""
    for key, value in fields.items():
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise TypeError(f"journal field {key} must be str or int")
    if _journal_available():
        from systemd import journal  # noqa: PLC0415  # lazy: agent start-up time

        journal.send(
            message,
            MESSAGE_ID=event.value,
            PRIORITY=str(priority),
            SYSLOG_IDENTIFIER="keyhandoff",
            KEYHANDOFF_EVENT=event.name,
            **{f"KEYHANDOFF_{k.upper()}": str(v) for k, v in fields.items()},
        )
        return
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    sys.stderr.write(f"keyhandoff: {event.name} {message}{extra}\n")
    sys.stderr.flush()
