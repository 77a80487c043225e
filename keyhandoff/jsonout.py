"""The one JSON vocabulary of ``--json``: the same names and types for the same things.

Every command's ``--json`` output is built here from the library's reports (whose own
``as_dict()`` forms stay as they were for the runner API).  README.md's table "JSON
output" lists every key; tests/integration/test_cli.py fails when a command prints a key
that table lacks.

* a volume is always ``{"uuid", "name", "source"}`` (``name``/``source`` null when
  unknown), in a list under ``volumes`` (``cached`` for ``cache list`` and status);
* a point in time ``X`` is two keys, ``X`` (ISO 8601 in UTC, ``2026-12-02T14:41:18Z``)
  and ``X_usec`` (microseconds since the epoch, the unit of systemd's JSON): a person and
  ``jq`` read the first, a program compares the second without parsing dates;
* a span is ``X_usec`` alone (systemd's ``TimeoutStartUSec`` & co.);
* yes/no is a JSON boolean; a count an integer; words for people are ``detail`` or
  ``X_detail`` strings;
* a failed command prints ``{"error": {"message": ..., "code": <exit code>}}``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from keyhandoff import timefmt
from keyhandoff.asking import resolve_volume

if TYPE_CHECKING:
    from collections.abc import Iterable

    from keyhandoff.cache import CacheEntry
    from keyhandoff.chain import Target
    from keyhandoff.config import Loaded, Problem
    from keyhandoff.reports import ArmReport, FinishReport, RestoreReport

__all__ = ["arm", "cache_list", "config", "disarm", "error", "finish", "restore", "schedule",
           "status", "volume"]

USEC_PER_SEC = 1_000_000


def volume(uuid: str | None, name: str | None = None, source: str | None = None,
           **extra: object) -> dict[str, Any]:
    """A volume: its LUKS UUID, crypttab name and source path (null when unknown)."""
    return {"uuid": uuid, "name": name if name != uuid else None, "source": source, **extra}


def _target(t: Target, **extra: object) -> dict[str, Any]:
    return volume(t.uuid, t.name, t.path) | extra


def _by_uuid(uuid: str, **extra: object) -> dict[str, Any]:
    """A volume known by UUID: its crypttab name and path when crypttab has it."""
    with contextlib.suppress(Exception):
        t = resolve_volume(uuid)
        if t.name != uuid:
            return _target(t, **extra)
    return volume(uuid) | extra


def _by_name(name: str, **extra: object) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        return _target(resolve_volume(name), **extra)
    return volume(None, name) | extra


def when(key: str, unix: int | None) -> dict[str, Any]:
    """``{key: ISO 8601 UTC, key_usec: microseconds}`` (both null for "never")."""
    if unix is None:
        return {key: None, f"{key}_usec": None}
    return {key: timefmt.iso(unix), f"{key}_usec": timefmt.usec(unix)}


def error(message: str, code: int) -> dict[str, Any]:
    """What a failed command prints on stdout with ``--json`` (the message is on stderr too)."""
    return {"error": {"message": message, "code": code}}


def _cached(entries: Iterable[CacheEntry], now: int) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        expires = None if e.seconds_left is None else now + e.seconds_left
        # "volume": the UUID under its 0.1 name, for readers of 0.1 (deprecated)
        out.append(_by_uuid(e.volume, serial=e.serial, volume=e.volume,
                            **when("expires", expires)))
    return out


def cache_list(entries: Iterable[CacheEntry], now: int) -> list[dict[str, Any]]:
    """``cache list``: the cached volumes (an array, as in 0.1)."""
    return _cached(entries, now)


def arm(report: ArmReport) -> dict[str, Any]:
    """``arm`` and ``rearm``."""
    return {
        "channel": report.channel, "reboot": report.reboot, "boots": report.boots,
        **when("deadline", report.deadline),
        "login": report.login != "not requested", "login_detail": report.login,
        "volumes": [{**(_by_uuid(v.uuid) if v.uuid else _by_name(v.name)),
                     "name": v.name if v.name != v.uuid else None,
                     "armed": v.armed, "detail": v.how} for v in report.volumes],
    }


def disarm(counts: dict[str, int]) -> dict[str, Any]:
    """``disarm``: what it removed."""
    return {"records_removed": counts["records"], "keys_removed": counts["keys"],
            "keyslots_destroyed": counts["keyslots"]}


def restore(report: RestoreReport) -> dict[str, Any]:
    """``restore``."""
    return {"channel": report.channel, "volumes": [_by_uuid(u) for u in report.restored],
            "refused": report.refused is not None, "refused_detail": report.refused,
            "keyslots_destroyed": report.keyslots_destroyed}


def finish(report: FinishReport) -> dict[str, Any]:
    """``finish``."""
    return {"keyslots_destroyed": report.keyslots_destroyed, "login_detail": report.login}


def schedule(data: dict[str, Any]) -> dict[str, Any]:
    """``schedule``: :meth:`keyhandoff.schedule.ScheduleReport.as_dict` in the vocabulary."""
    out: dict[str, Any] = {
        "action": data["action"], "detail": data["detail"], "ok": data["ok"],
        "update_scheduled": data.get("scheduled"),
        "volumes": [_by_name(n) for n in data.get("volumes", [])],
    }
    for key in ("channel", "boots", "armed_automatically"):
        if key in data:
            out[key] = data[key]
    if "deadline" in data:
        out |= when("deadline", data["deadline"])
    if "consumed" in data:
        out["passphrases_consumed"] = data["consumed"]
    if "counts" in data:
        out |= disarm(data["counts"])
    return out


def config(loaded: Loaded) -> dict[str, Any]:
    """``config``: the effective settings, where each came from, the files' problems.

    A setting ``section.key`` is ``section_key`` (a duration ``section_key_usec``), so that
    each key has one type; ``sources`` names each setting as keyhandoff.conf(5) writes it.
    """
    from keyhandoff.config import DURATIONS  # noqa: PLC0415  # the agent imports this lazily

    settings: dict[str, Any] = {}
    for s in loaded.settings:
        key = s.name.replace(".", "_")
        if s.name in DURATIONS:
            settings[f"{key}_usec"] = s.value * USEC_PER_SEC
        else:
            settings[key] = s.value
    return {
        "files": list(loaded.files), "settings": settings,
        "sources": [{"setting": s.name, "file": s.path, "line": s.line}
                    for s in loaded.settings],
        "errors": [_problem(p) for p in loaded.errors],
        "warnings": [_problem(p) for p in loaded.warnings],
        "ok": not loaded.errors,
        "config_error_detail": loaded.for_boot().config_error,
    }


def _problem(p: Problem) -> dict[str, Any]:
    return {"file": p.path, "line": p.line, "message": p.message}


def status(sections: dict[str, dict[str, Any]], now: int) -> dict[str, Any]:
    """``status``: its sections, each in the vocabulary (a failed probe: ``problem``)."""
    out: dict[str, Any] = {}
    for name, values in sections.items():
        convert = _SECTIONS.get(name)
        if convert is None or set(values) == {"error"}:
            out[name] = {"problem": values.get("error")} if "error" in values else values
            continue
        out[name] = convert(values, now)
    return out


def _keyring(v: dict[str, Any], now: int) -> dict[str, Any]:
    if not v.get("usable"):
        return {"usable": False, "problem": v.get("error")}
    cached = v.get("cached_volumes")
    out: dict[str, Any] = {"usable": True,
                           "user_keyring_possessed": v.get("user_keyring_possessed")}
    if isinstance(cached, list):
        out["cached"] = [
            _by_uuid(e["volume"], serial=e["serial"], **when(
                "expires", None if e["seconds_left"] is None else now + e["seconds_left"]))
            for e in cached
        ]
    else:
        out["cached"], out["problem"] = [], cached
    key = v.get("systemd_cryptsetup_key")
    out["systemd_cryptsetup_key"] = None if key is None else {
        "serial": key["serial"],
        **when("expires", None if key["seconds_left"] is None else now + key["seconds_left"])}
    return out


def _handoff(v: dict[str, Any], _now: int) -> dict[str, Any]:
    if not v.get("armed"):
        return {"armed": False}
    return {"armed": True, "channel": v["channel"], "reboot": v["reboot"],
            **when("deadline", v["deadline"]), "boots_left": v["boots_left"],
            "login": v["login"], "volumes": [_by_uuid(u) for u in v["volumes"]],
            "rearmed_this_boot": v["rearmed_this_boot"],
            "armed_automatically": v["armed_automatically"]}


def _schedule(v: dict[str, Any], _now: int) -> dict[str, Any]:
    out = {k: val for k, val in v.items() if k != "capture_timeout"}
    out["capture_timeout_usec"] = v["capture_timeout"] * USEC_PER_SEC
    return out


def _channels(v: dict[str, Any], _now: int) -> list[dict[str, Any]]:
    return [{"channel": name, **info} for name, info in v.items()]


def _volumes(v: dict[str, Any], _now: int) -> list[dict[str, Any]]:
    out = []
    for name, info in v.items():
        if "error" in info:
            out.append(volume(None, name, info.get("source"), problem=info["error"]))
        else:
            out.append(volume(info["uuid"], name, None, luks=info["luks"],
                              keyslots=info["keyslots"],
                              onetime_keyslots=info["onetime_keyslots"]))
    return out


_SECTIONS: dict[str, Any] = {"keyring": _keyring, "handoff": _handoff,
                             "schedule": _schedule, "channels": _channels,
                             "volumes": _volumes}
