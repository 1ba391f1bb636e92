"""A profile's `remote:` section: which device(s) measure, and how to reach them over SSH.

    remote:
      host: pi5.local            # or hosts: [pi5-a.local, pi5-b.local:2222] for a pool of identical devices
      port: 22
      user: pi
      key: ~/.ssh/id_ed25519     # private key file; passwords are never used, nothing ever prompts
      known_hosts: ~/.ssh/known_hosts   # strict: an unknown or changed host key is refused (exit 2)
      python: python3            # the device's interpreter that has the runtime and numpy
      workdir: /tmp              # each session works in a fresh folder under it, removed at the end
      runtime_version: "1.20"    # optional: refuse a device whose runtime version differs

Relative paths are taken from the profile file's folder. Free of asyncssh, so a
profile parses without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InputError

DEFAULTS = {"port": 22, "python": "python3", "workdir": "/tmp", "connect_timeout_s": 15.0,
            "command_timeout_s": 600.0, "retries": 3, "retry_wait_s": 2.0, "cool_above_c": 75.0,
            "cool_max_s": 120.0, "retime_every": 4, "drift_tolerance": 0.10}
TEXT_KEYS = ("host", "user", "key", "known_hosts", "python", "workdir", "runtime_version")
NUMBER_KEYS = ("connect_timeout_s", "command_timeout_s", "retry_wait_s", "cool_above_c", "cool_max_s",
               "drift_tolerance")
INT_KEYS = ("port", "retries", "retime_every")
KNOWN = (*TEXT_KEYS, *NUMBER_KEYS, *INT_KEYS, "hosts")


@dataclass(frozen=True)
class Endpoint:
    """One device's address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RemoteSpec:
    """How to reach the device(s) and measure there; timeouts in seconds, temperatures in degrees C."""

    endpoints: tuple[Endpoint, ...]
    user: str
    key: Path
    known_hosts: Path
    python: str = "python3"
    workdir: str = "/tmp"
    runtime_version: str | None = None
    connect_timeout_s: float = 15.0  # TCP connect and SSH login, each
    command_timeout_s: float = 600.0  # one runner command, on top of the time its floors need
    retries: int = 3  # a transient failure (connection lost, runner killed) is retried this many times
    cool_above_c: float = 75.0  # before a measurement, wait while the hottest thermal zone is above this
    cool_max_s: float = 120.0  # ... but no longer than this
    retime_every: int = 4  # re-time the first measured (reference) artifact at least every N measurements
    drift_tolerance: float = 0.10  # flag the reference's median moving more than this from its first figure
    retry_wait_s: float = 2.0  # the wait before the first retry, doubled before each further one

    def to_dict(self) -> dict:
        """What a report records about where it measured (no secrets: the key's path, not the key)."""
        return {"hosts": [str(e) for e in self.endpoints], "user": self.user, "python": self.python,
                "workdir": self.workdir, "runtime_version": self.runtime_version}


def _fail(source: str, key: str, what: str, value: object) -> InputError:
    return InputError(f"profile {source}: remote.{key} must be {what}, got {value!r}")


def _path(raw: dict, key: str, base: Path, source: str, default: str | None = None) -> Path:
    value = raw.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, key, "a file path", value)
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _endpoint(text: object, port: int, source: str) -> Endpoint:
    """`host`, `host:port`, `[v6]` or `[v6]:port` (a bare IPv6 address takes `port`)."""
    if not isinstance(text, str) or not text.strip() or any(c.isspace() for c in text.strip()):
        raise _fail(source, "hosts", "a list of host names (host or host:port)", text)
    text, tail = text.strip(), None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            tail = rest[1:] if rest.startswith(":") else "?"
    elif text.count(":") == 1:
        host, _, tail = text.partition(":")
    else:
        host = text
    if tail is not None and (not tail.isdigit() or not 0 < int(tail) < 65536 or not host):
        raise _fail(source, "hosts", "host or host:port with a port in 1..65535", text)
    return Endpoint(host, int(tail) if tail is not None else port)


def _checked(raw: dict, source: str) -> dict:
    """The section's scalar values, type-checked, over the defaults."""
    unknown = sorted(str(k) for k in raw if k not in KNOWN)
    if unknown:
        msg = f"profile {source}: unknown remote field(s) {', '.join(unknown)}; known: {', '.join(KNOWN)}"
        raise InputError(msg)
    values = {**DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}
    for key in TEXT_KEYS:
        if key in values and (not isinstance(values[key], (str, int, float)) or isinstance(values[key], bool)
                              or not str(values[key]).strip()):
            raise _fail(source, key, "a non-empty string", values[key])
    for key in INT_KEYS:
        if isinstance(values[key], bool) or not isinstance(values[key], int) or values[key] < 0:
            raise _fail(source, key, "a non-negative integer", values[key])
    for key in NUMBER_KEYS:
        if isinstance(values[key], bool) or not isinstance(values[key], (int, float)) or values[key] <= 0:
            raise _fail(source, key, "a positive number", values[key])
    if not 0 < values["port"] < 65536:
        raise _fail(source, "port", "a port in 1..65535", values["port"])
    return values


def parse_remote(raw: object, source: str) -> RemoteSpec | None:
    """The `remote:` section of profile `source` (a file path or builtin:NAME); None if it has none."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        msg = f"profile {source}: 'remote' must be a mapping (host, user, key, known_hosts, ...)"
        raise InputError(msg)
    values = _checked(raw, source)
    hosts = values.get("hosts") or []
    if not isinstance(hosts, list):
        raise _fail(source, "hosts", "a list of host names", hosts)
    names = ([str(values["host"])] if "host" in values else []) + hosts
    if not names:
        msg = f"profile {source}: remote needs a host (or hosts: [...] for a pool)"
        raise InputError(msg)
    endpoints = tuple(dict.fromkeys(_endpoint(h, values["port"], source) for h in names))
    if "user" not in values:
        msg = f"profile {source}: remote needs a user (the device's login name)"
        raise InputError(msg)
    base = Path(source).resolve().parent if Path(source).is_file() else Path.cwd()
    version = values.get("runtime_version")
    return RemoteSpec(
        endpoints, str(values["user"]), _path(values, "key", base, source),
        _path(values, "known_hosts", base, source, "~/.ssh/known_hosts"), str(values["python"]),
        str(values["workdir"]), str(version) if version is not None else None, float(values["connect_timeout_s"]),
        float(values["command_timeout_s"]), values["retries"], float(values["cool_above_c"]),
        float(values["cool_max_s"]), max(1, values["retime_every"]), float(values["drift_tolerance"]),
        float(values["retry_wait_s"]))
