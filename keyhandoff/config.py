"""The configuration file ``/etc/keyhandoff/keyhandoff.conf`` (TOML).

Every key is optional; the defaults are the safe ones.  Validated once, into a frozen
:class:`Config`.  Example with the defaults::

    [capture]
    retain = 600          # seconds a captured, verified passphrase stays cached; 0 = off
    wait_for_update = "8h"  # with update.auto_arm: how long it may wait for an update
                            # (a systemd time span or seconds; 0..24h; see SECURITY.md)

    [update]
    auto_arm = true       # arm the handoff when an offline update is scheduled

    [login]
    enabled = false       # hand the passphrase typed at boot to the login path
    timeout = 120         # seconds the login keys live

    [agent]
    ask_dir = "/run/systemd/ask-password"
    systemd_keyname = "cryptsetup"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from typing import Any, Final

from keyhandoff import names, timespan
from keyhandoff.errors import ConfigError

__all__ = ["DEFAULT_PATH", "Config", "load"]

DEFAULT_PATH: Final = names.CONFIG_PATH
_MAX_SECONDS: Final = 86400


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings."""

    retain: int = 600
    #: seconds a captured passphrase may wait for a scheduled offline update (auto_arm)
    wait_for_update: int = 8 * 3600
    auto_arm: bool = True
    login_enabled: bool = False
    login_timeout: int = 120
    ask_dir: str = names.ASK_DIR
    systemd_keyname: str = names.SYSTEMD_KEYNAME

    def __post_init__(self) -> None:
        if not 0 <= self.retain <= _MAX_SECONDS:
            raise ConfigError(f"capture.retain must be 0..{_MAX_SECONDS} seconds")
        if not 0 <= self.wait_for_update <= _MAX_SECONDS:
            raise ConfigError("capture.wait_for_update must be 0..24h")
        if not 1 <= self.login_timeout <= 3600:
            raise ConfigError("login.timeout must be 1..3600 seconds")
        if not self.ask_dir.startswith("/"):
            raise ConfigError("agent.ask_dir must be an absolute path")
        if not self.systemd_keyname or "\0" in self.systemd_keyname:
            raise ConfigError("agent.systemd_keyname must be a non-empty name")

    @property
    def capture_timeout(self) -> int:
        """The kernel timeout of a captured passphrase, in seconds.

        ``retain``, or with automatic arming the longer of ``retain`` and
        ``wait_for_update``.  0 (capture off) stays 0.
        """
        if self.retain == 0 or not self.auto_arm:
            return self.retain
        return max(self.retain, self.wait_for_update)


#: a time span: a systemd-style string ("8h") or an integer of seconds
_SPAN: Final = "span"
_SCHEMA: Final[dict[tuple[str, str], tuple[str, type | str]]] = {
    ("capture", "retain"): ("retain", int),
    ("capture", "wait_for_update"): ("wait_for_update", _SPAN),
    ("update", "auto_arm"): ("auto_arm", bool),
    ("login", "enabled"): ("login_enabled", bool),
    ("login", "timeout"): ("login_timeout", int),
    ("agent", "ask_dir"): ("ask_dir", str),
    ("agent", "systemd_keyname"): ("systemd_keyname", str),
}


def parse(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document."""
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        for key, value in table.items():
            spec = _SCHEMA.get((section, key))
            if spec is None:
                raise ConfigError(f"unknown setting {section}.{key}")
            name, kind = spec
            if kind == _SPAN:
                values[name] = _span(f"{section}.{key}", value)
                continue
            if type(value) is not kind:
                raise ConfigError(f"{section}.{key} must be {getattr(kind, '__name__', kind)}")
            values[name] = value
    return Config(**values)


def _span(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f'{name} must be a time span ("8h", "1h 30min") or seconds')
    try:
        return timespan.parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def load(path: str = DEFAULT_PATH) -> Config:
    """Read and validate the file; a missing file means the defaults."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return Config()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse(data)

