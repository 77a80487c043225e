"""The configuration file ``/etc/keyhandoff/keyhandoff.conf`` (TOML).

Every key is optional; the defaults are the safe ones.  Validated once, into a frozen
:class:`Config`.  Example with the defaults::

    [capture]
    retain = 600          # seconds a captured, verified passphrase stays cached; 0 = off

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

from keyhandoff import names
from keyhandoff.errors import ConfigError

__all__ = ["DEFAULT_PATH", "Config", "load"]

DEFAULT_PATH: Final = names.CONFIG_PATH
_MAX_SECONDS: Final = 86400


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings."""

    retain: int = 600
    login_enabled: bool = False
    login_timeout: int = 120
    ask_dir: str = names.ASK_DIR
    systemd_keyname: str = names.SYSTEMD_KEYNAME

    def __post_init__(self) -> None:
        if not 0 <= self.retain <= _MAX_SECONDS:
            raise ConfigError(f"capture.retain must be 0..{_MAX_SECONDS} seconds")
        if not 1 <= self.login_timeout <= 3600:
            raise ConfigError("login.timeout must be 1..3600 seconds")
        if not self.ask_dir.startswith("/"):
            raise ConfigError("agent.ask_dir must be an absolute path")
        if not self.systemd_keyname or "\0" in self.systemd_keyname:
            raise ConfigError("agent.systemd_keyname must be a non-empty name")


_SCHEMA: Final[dict[tuple[str, str], tuple[str, type]]] = {
    ("capture", "retain"): ("retain", int),
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
            if type(value) is not kind:
                raise ConfigError(f"{section}.{key} must be {kind.__name__}")
            values[name] = value
    return Config(**values)


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

