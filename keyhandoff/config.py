"""keyhandoff's configuration (TOML), read in layers as systemd reads its own.

The files, lowest precedence first (keyhandoff.conf(5) has the full story):

1. ``/usr/lib/keyhandoff/keyhandoff.conf``: the vendor file, every default written out
   (``make install`` ships it; a distribution may change a default there);
2. ``/etc/keyhandoff/keyhandoff.conf``: the administrator's file, optional, not shipped;
3. the drop-ins ``keyhandoff.conf.d/*.conf`` of ``/usr/lib/keyhandoff``,
   ``/run/keyhandoff`` and ``/etc/keyhandoff``: a drop-in masks one of the same name in a
   lower directory (``/etc`` > ``/run`` > ``/usr/lib``; a link to ``/dev/null`` masks it
   with nothing), and the survivors are read in the lexical order of their names, whatever
   their directory.

A later file overrides an earlier one setting by setting; what no file sets keeps the
compiled-in default (:class:`Config`), which is the safe one.  Unlike systemd 254+, whose
first main file found masks the others, both main files are read: an ``/etc`` file with one
setting keeps the vendor's values of the rest.

Checking: an unknown section or setting is a warning (ignored); a value of the wrong type or
out of bounds, a file that is not UTF-8 or not TOML, a file that cannot be read, is an error.
Every :class:`Problem` names its file and line.  tomllib reports the line of a syntax error
but not the line of a key, so the line of a setting is found by a small scan of the file's
text for its ``[section]`` header and its ``key =`` line (:func:`_locate`); it is
best-effort (a multi-line string that looks like a key can mislead it) and falls back to the
section's header, then to line 1.

:func:`load` is for the commands that may refuse to run (``agent``, ``login-handoff``): any
error raises :class:`~keyhandoff.errors.ConfigError`.  :func:`load_for_boot` is for the boot
steps that destroy one-time keyslots or clean up (``finish``, ``capture-initrd``,
``schedule``): it never raises; each bad file or setting is left out (so the lower layers or
the defaults decide), each problem goes to the journal with its file and line, and the step
does its work.  But on any error, capture and automatic arming are off whatever the files
say (``retain`` 0, ``auto_arm`` false, :attr:`Config.config_error` says why): the defaults
that decide in place of what was left out turn both on, and a broken file meant to turn them
off must not do the opposite.  An explicit path (``--config PATH``) means that file alone, no
layers, no drop-ins; that it does not exist is an error.

Example with the defaults::

    [capture]
    retain = 600          # seconds a captured, verified passphrase stays cached; 0 = off
    wait_for_update = "8h"  # with update.auto_arm: how long it may wait for an update
                            # (a systemd time span or seconds; 0..24h; see SECURITY.md)

    [update]
    auto_arm = true       # arm the handoff when an offline update is scheduled
    reboot = "full"       # the reboots it arms for: "full" (EFI record) or "kexec"

    [login]
    enabled = false       # hand the passphrase typed at boot to the login path
    timeout = 120         # seconds the login keys live

    [agent]
    ask_dir = "/run/systemd/ask-password"
    systemd_keyname = "cryptsetup"
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import tomllib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from keyhandoff import names, timespan
from keyhandoff.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ADMIN_PATH", "DEFAULT_PATH", "DROPIN_DIRS", "DURATIONS", "VENDOR_PATH", "Config",
           "Loaded",
           "Problem", "Setting", "as_dict", "as_toml", "fail_safe", "files", "load",
           "load_for_boot",
           "parse", "read", "value_text"]

#: The vendor defaults (``make install``), the lowest layer.
VENDOR_PATH: Final = "/usr/lib/keyhandoff/keyhandoff.conf"
#: The administrator's file (optional; not shipped).
ADMIN_PATH: Final = names.CONFIG_PATH
DEFAULT_PATH: Final = ADMIN_PATH  # the name callers knew it by
#: The drop-in directories, lowest precedence first.
DROPIN_DIRS: Final = ("/usr/lib/keyhandoff/keyhandoff.conf.d",
                      "/run/keyhandoff/keyhandoff.conf.d",
                      "/etc/keyhandoff/keyhandoff.conf.d")
_MAX_SECONDS: Final = 86400
#: a file larger than this is not a configuration file (read no further)
_MAX_BYTES: Final = 1 << 20
#: What ``[update] reboot`` may say: the reboots of an offline update an automatic arming
#: carries across (``soft`` is no offline update's: its runners reboot fully or kexec).
AUTO_REBOOTS: Final = ("full", "kexec")


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings."""

    retain: int = 600
    #: seconds a captured passphrase may wait for a scheduled offline update (auto_arm)
    wait_for_update: int = 8 * 3600
    auto_arm: bool = True
    #: the reboots an automatic arming is for: ``full`` (efi channel) or ``kexec``
    auto_reboot: str = "full"
    login_enabled: bool = False
    login_timeout: int = 120
    ask_dir: str = names.ASK_DIR
    systemd_keyname: str = names.SYSTEMD_KEYNAME
    #: set by :meth:`Loaded.for_boot` when a file or setting had an error: why ``retain``
    #: and ``auto_arm`` are off ("capture and auto-arm disabled because of config error at
    #: FILE:LINE"); not a setting of any file
    config_error: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.retain <= _MAX_SECONDS:
            raise ConfigError(f"capture.retain must be 0..{_MAX_SECONDS} seconds")
        if not 0 <= self.wait_for_update <= _MAX_SECONDS:
            raise ConfigError("capture.wait_for_update must be 0..24h")
        if self.auto_reboot not in AUTO_REBOOTS:
            raise ConfigError('update.reboot must be "full" or "kexec"')
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
    ("update", "reboot"): ("auto_reboot", str),
    ("login", "enabled"): ("login_enabled", bool),
    ("login", "timeout"): ("login_timeout", int),
    ("agent", "ask_dir"): ("ask_dir", str),
    ("agent", "systemd_keyname"): ("systemd_keyname", str),
}
_SECTIONS: Final = tuple(dict.fromkeys(s for s, _k in _SCHEMA))
#: the settings that are durations in seconds (``--json`` shows them as ``_usec`` spans)
DURATIONS: Final = frozenset({"capture.retain", "capture.wait_for_update", "login.timeout"})


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file: where (``line`` None: the file as a whole) and what."""

    path: str
    line: int | None
    message: str
    #: ``error`` (the file or setting is left out) or ``warning`` (ignored, harmless)
    severity: str = "error"

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"file": self.path, "line": self.line, "message": self.message,
                "severity": self.severity}


@dataclass(frozen=True, slots=True)
class Setting:
    """One effective setting and where it came from (``path`` None: the default)."""

    name: str
    value: Any
    path: str | None = None
    line: int | None = None

    @property
    def source(self) -> str:
        """``file:line``, or ``default``."""
        return "default" if self.path is None else f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What :func:`read` found: the effective :class:`Config`, built from what was valid."""

    config: Config
    settings: tuple[Setting, ...]
    #: the files read, in the order read (lowest precedence first)
    files: tuple[str, ...]
    problems: tuple[Problem, ...]

    @property
    def errors(self) -> list[Problem]:
        """The problems that left a file or a setting out."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The ignored unknown sections and settings."""
        return [p for p in self.problems if p.severity == "warning"]

    def for_boot(self) -> Config:
        """The configuration the boot steps and ``status`` use: on any error, fail-safe.

        Leaving a bad file or setting out lets the lower layers or the compiled-in defaults
        decide, and those turn capture and automatic arming on: a broken drop-in meant to
        switch them off would switch them on.  So any error turns both off (``retain`` 0:
        nothing captured, nothing kept for an update; ``auto_arm`` false), and says why in
        :attr:`Config.config_error`.  Warnings change nothing.
        """
        errors = self.errors
        if not errors:
            return self.config
        first = errors[0]
        where = first.path if first.line is None else f"{first.path}:{first.line}"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return fail_safe(self.config, f"capture and auto-arm disabled because of config "
                         f"error at {where}{more}")

    def checked(self) -> Config:
        """The configuration, or :class:`ConfigError` (the first error) if any file had one."""
        errors = self.errors
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(f"{errors[0]}{more}")
        return self.config


def _under(root: str, path: str) -> str:
    return path if root in {"", "/"} else os.path.join(root, path.lstrip("/"))


def files(*, root: str = "/") -> list[str]:
    """The files :func:`read` reads, in order, below ``root`` (a scratch root in tests)."""
    found = [p for p in (_under(root, VENDOR_PATH), _under(root, ADMIN_PATH))
             if os.path.lexists(p)]
    dropins: dict[str, str] = {}
    for directory in DROPIN_DIRS:  # lowest first: a higher directory's file replaces
        path = _under(root, directory)
        try:
            entries = os.listdir(path)
        except OSError:
            continue
        for name in entries:
            if name.endswith(".conf") and not name.startswith("."):
                dropins[name] = os.path.join(path, name)
    return found + [dropins[name] for name in sorted(dropins)]


def read(path: str | None = None, *, root: str = "/") -> Loaded:
    """Read every layer (or only ``path``), check each file, never raise for what is in one.

    An explicit ``path`` that does not exist or cannot be read raises :class:`ConfigError`:
    it was asked for by name.  In the layers a file that vanished is skipped and one that
    cannot be read is an error :class:`Problem`.
    """
    if path is not None:
        try:
            with open(path, "rb") as f:
                f.read(0)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        paths = [path]
    else:
        paths = files(root=root)
    chosen: dict[str, Setting] = {}
    problems: list[Problem] = []
    read_files: list[str] = []
    for p in paths:
        values, found, missing = _read_one(p, explicit=path is not None)
        problems += found
        if missing:
            continue
        read_files.append(p)
        for setting in values:
            chosen[setting.name] = setting
    # each value was checked alone, and Config checks no pair of settings: this cannot fail
    config = _config(chosen.values())
    settings = tuple(chosen.get(f"{s}.{k}", Setting(f"{s}.{k}", getattr(config, field)))
                     for (s, k), (field, _kind) in _SCHEMA.items())
    return Loaded(config, settings, tuple(read_files), tuple(problems))


def load(path: str | None = None, *, root: str = "/") -> Config:
    """The checked configuration; :class:`ConfigError` on any error (warnings are dropped)."""
    return read(path, root=root).checked()


def fail_safe(config: Config, why: str) -> Config:
    """``config`` with capture and automatic arming off, saying ``why``."""
    return replace(config, retain=0, auto_arm=False, config_error=why)


def load_for_boot(step: str, *, root: str = "/") -> Config:
    """For a boot step: the configuration with every bad file or setting left out.

    Never raises: a typo must not keep ``finish`` from destroying one-time keyslots.  Each
    problem is logged (an error at ``err``, a warning at ``warning``) with its file and line.
    On any error capture and automatic arming are off (:meth:`Loaded.for_boot`), and one
    more line at ``err`` says so and why.
    """
    from keyhandoff import journal  # noqa: PLC0415  # the agent's start-up imports config

    try:
        loaded = read(root=root)
    except Exception as exc:  # noqa: BLE001  # a bug here must not stop a boot step either
        why = (f"capture and auto-arm disabled because the configuration could not be read "
               f"({type(exc).__name__})")
        journal.log(journal.Event.CONFIG, f"configuration not read: {step} uses the defaults; "
                    f"{why}", priority=journal.ERR, step=step)
        return fail_safe(Config(), why)
    for problem in loaded.problems:
        error = problem.severity == "error"
        then = f"; {step} goes on without it" if error else ""
        journal.log(journal.Event.CONFIG, f"configuration {problem.severity}: {problem}{then}",
                    priority=journal.ERR if error else journal.WARNING, step=step,
                    file=problem.path, line=problem.line or 0)
    conf = loaded.for_boot()
    if conf.config_error is not None:
        journal.log(journal.Event.CONFIG, f"{step}: {conf.config_error}",
                    priority=journal.ERR, step=step)
    return conf


def parse(data: dict[str, Any], *, path: str = "<config>", text: str = "") -> Config:
    """Check an already parsed TOML document; :class:`ConfigError` on any error."""
    values, problems = _check(data, path, text)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(str(errors[0]))
    return _config(values)


def _config(settings: Iterable[Setting]) -> Config:
    fields = {f"{s}.{k}": field for (s, k), (field, _kind) in _SCHEMA.items()}
    return Config(**{fields[s.name]: s.value for s in settings})


# --- one file -------------------------------------------------------------------------------

_LINE_COLUMN: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _read_one(path: str, *, explicit: bool) -> tuple[list[Setting], list[Problem], bool]:
    """The valid settings of one file, its problems, and whether it was not there at all."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        if explicit:
            return [], [Problem(path, None, "no such file")], False
        return [], [], True  # removed since it was listed (or a dangling link): not there
    except OSError as exc:
        message = "is a directory" if exc.errno == errno.EISDIR else (exc.strerror or str(exc))
        return [], [Problem(path, None, f"cannot be read: {message}")], False
    data, text, problem = _parse_bytes(path, raw)
    if problem is not None:
        return [], [problem], False
    values, problems = _check(data, path, text)
    return values, problems, False


def _parse_bytes(path: str, raw: bytes) -> tuple[dict[str, Any], str, Problem | None]:
    """The TOML document in ``raw``, its text, or the one problem that leaves it out."""
    if len(raw) > _MAX_BYTES:
        return {}, "", Problem(path, None, f"larger than {_MAX_BYTES} bytes: not read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return {}, "", Problem(path, line, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}): "
                               "the file is left out")
    try:
        return tomllib.loads(text), text, None
    except RecursionError:
        return {}, text, Problem(path, None, "not valid TOML: nested too deeply: the file is "
                                 "left out")
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        m = _LINE_COLUMN.search(message)
        where: int | None = None
        if m:
            where = int(m.group(1))
            message = f"{message[:m.start()]} (column {m.group(2)})"
        if message.endswith(" (at end of document)"):
            where = text.count("\n") + 1
            message = message.removesuffix(" (at end of document)") + " at the end of the file"
        return {}, text, Problem(path, where, f"not valid TOML: {message}: the file is left out")


def _check(data: dict[str, Any], path: str, text: str) -> tuple[list[Setting], list[Problem]]:
    """The valid settings of a parsed file and a problem for each thing wrong in it."""
    values: list[Setting] = []
    problems: list[Problem] = []
    for section, table in data.items():
        if section not in _SECTIONS:
            problems.append(Problem(path, _locate(text, section), f"unknown section "
                                    f"[{section}]{_hint(section, _SECTIONS)}, ignored",
                                    "warning"))
            continue
        if not isinstance(table, dict):
            problems.append(Problem(path, _locate(text, section),
                                    f"[{section}] must be a table"))
            continue
        for key, value in table.items():
            line = _locate(text, section, key)
            spec = _SCHEMA.get((section, key))
            if spec is None:
                known = [k for s, k in _SCHEMA if s == section]
                problems.append(Problem(path, line, f"unknown setting {section}.{key}"
                                        f"{_hint(key, known)}, ignored", "warning"))
                continue
            try:
                checked = _value(section, key, spec, value)
            except ConfigError as exc:
                problems.append(Problem(path, line, f"{exc}: the setting is left out"))
                continue
            values.append(Setting(f"{section}.{key}", checked, path, line))
    return values, problems


def _hint(name: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _value(section: str, key: str, spec: tuple[str, type | str], value: object) -> object:
    """``value`` checked alone: its type, then its bounds (through :class:`Config`)."""
    field, kind = spec
    name = f"{section}.{key}"
    if kind == _SPAN:
        value = _span(name, value)
    elif type(value) is not kind:
        want = getattr(kind, "__name__", kind)
        raise ConfigError(f"{name} must be {want}, not {_toml_type(value)}")
    Config(**{field: value})  # type: ignore[arg-type]  # the bounds of this one setting
    return value


_TOML_TYPES: Final = ((bool, "a boolean"), (int, "an integer"), (float, "a float"),
                      (str, "a string"), (list, "an array"), (dict, "a table"))


def _toml_type(value: object) -> str:
    return next((name for kind, name in _TOML_TYPES if isinstance(value, kind)),
                "a date or time")


def _span(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f'{name} must be a time span ("8h", "1h 30min") or seconds')
    try:
        return timespan.parse_seconds(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


_HEADER: Final = re.compile(r"\[+\s*(.+?)\s*\]")
_KEY: Final = re.compile(r"""((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                         r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _dotted(text: str) -> str:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return ".".join(p.strip("\"'") for p in parts)


def _locate(text: str, section: str, key: str | None = None) -> int:
    """Best-effort line of ``[section]`` ``key =`` (or of the section) in ``text``.

    A scan of the lines, not a TOML parser: it follows ``[table]`` headers and matches
    ``key =`` and dotted keys (``capture.retain =`` at the top, ``section = {...}``).  Falls
    back to the section's first line, then to line 1.
    """
    table = ""
    section_line: int | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("["):
            m = _HEADER.match(line)
            table = _dotted(m.group(1)) if m else ""
            if section_line is None and (table == section or table.startswith(section + ".")):
                section_line = number
            continue
        m = _KEY.match(line)
        if not m:
            continue
        full = ".".join(filter(None, (table, _dotted(m.group(1)))))
        if key is not None and full == f"{section}.{key}":
            return number
        if section_line is None and (full == section or full.startswith(section + ".")):
            section_line = number
    return section_line or 1


# --- the effective configuration as text -----------------------------------------------------


def value_text(setting: Setting) -> str:
    """A setting's value as TOML (a span as systemd writes one: ``"8h"``, ``"1h 30min"``)."""
    value = setting.value
    if setting.name == "capture.wait_for_update":
        return f'"{_span_text(value)}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


def _span_text(seconds: int) -> str:
    if seconds == 0:
        return "0"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


def as_toml(loaded: Loaded) -> str:
    """The effective configuration as a TOML file, each line saying where it came from."""
    out = [f"# {p}" for p in loaded.files] or ["# no configuration file: the defaults"]
    why = loaded.for_boot().config_error
    if why is not None:
        out += [f"# {why}:", ("# the boot steps run with capture.retain = 0 and "
                              "update.auto_arm = false; the agent and login-handoff do not run")]
    section = ""
    for setting in loaded.settings:
        s, k = setting.name.split(".", 1)
        if s != section:
            out += ["", f"[{s}]"]
            section = s
        out.append(f"{k} = {value_text(setting)}  # {setting.source}")
    return "\n".join(out) + "\n"


def as_dict(loaded: Loaded) -> dict[str, Any]:
    """JSON-friendly form of the effective configuration."""
    return {
        "files": list(loaded.files),
        "settings": {s.name: {"value": s.value, "source": s.source, "file": s.path,
                              "line": s.line} for s in loaded.settings},
        "errors": [p.as_dict() for p in loaded.errors],
        "warnings": [p.as_dict() for p in loaded.warnings],
    }

