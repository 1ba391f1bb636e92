"""SSH to a device with asyncssh: one connection and its SFTP client per host, every step under a timeout.

asyncssh is imported when a remote profile is used (`pip install compressor[remote]`),
so `import compressor` does not need it. Its coroutines run on one background
event loop per process (`call`), so the rest of compressor stays synchronous.
Nothing ever prompts: no password or keyboard-interactive authentication, no
agent, no ~/.ssh/config, and host keys are checked strictly against the
profile's known_hosts file (never accepted on first use). Each failure becomes
one line: InputError (exit 2) where the user must act, TransientError where a
retry may help (a lost connection, a killed runner, a timeout).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.errors import InputError, MissingBackendError
from compressor.latency.remote.spec import Endpoint, RemoteSpec

HINT = "install it with `pip install asyncssh` (or `pip install compressor[remote]`)"
NO_SPACE_CODES = (14, 15)  # SFTP FX_NO_SPACE_ON_FILESYSTEM, FX_QUOTA_EXCEEDED
LOST_CODES = (6, 7)  # SFTP FX_NO_CONNECTION, FX_CONNECTION_LOST

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


class TransientError(Exception):
    """A failure a retry may cure: the connection dropped, the runner was killed, a step timed out."""


def asyncssh_module():
    """asyncssh, or MissingBackendError saying how to install it."""
    try:
        import asyncssh
    except ImportError as e:
        msg = f"a profile with a remote: section needs the 'asyncssh' package ({e}); {HINT}"
        raise MissingBackendError(msg) from e
    return asyncssh


def background_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for SSH, running in a daemon thread (started on first use)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="compressor-ssh", daemon=True).start()
        return _loop


def call(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on the background loop and wait for its result (the coroutine holds its own timeouts)."""
    future = asyncio.run_coroutine_threadsafe(coro, background_loop())
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise


@dataclass
class Answer:
    """A finished remote command."""

    status: int | None
    signal: str | None
    stdout: str
    stderr: str


def _host_key_message(asyncssh, spec: RemoteSpec, endpoint: Endpoint) -> str:
    """Unknown host (no line in known_hosts) or changed host key (a line that does not match)."""
    try:
        known = asyncssh.read_known_hosts(str(spec.known_hosts)).match(endpoint.host, endpoint.host, endpoint.port)
    except (OSError, ValueError):
        known = ([],)
    where = f"[{endpoint.host}]:{endpoint.port}" if endpoint.port != 22 else endpoint.host
    if known[0]:
        return (f"the host key of {endpoint} has CHANGED: it does not match {spec.known_hosts} (a reinstalled device, "
                f"or someone in between); if the change is expected, remove the old line with "
                f"`ssh-keygen -R '{where}' -f {spec.known_hosts}` and add the new key after checking it")
    return (f"{endpoint} is not in {spec.known_hosts} (unknown host key; compressor never accepts one on first use): "
            f"add it after checking its fingerprint, e.g. `ssh-keyscan -p {endpoint.port} {endpoint.host} "
            f">> {spec.known_hosts}`")


def _connect_error(asyncssh, e: BaseException, spec: RemoteSpec, endpoint: Endpoint,
                   reconnecting: bool = False) -> Exception:
    """One line for a failed connection: InputError, or TransientError for a timeout. `reconnecting` (the
    device was reached before, in this session): a refused or reset connection is transient too (a device
    rebooting, a Wi-Fi link that dropped), not a wrong address."""
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return InputError(_host_key_message(asyncssh, spec, endpoint))
    if isinstance(e, asyncssh.PermissionDenied):
        return InputError(f"{endpoint} refused the key {spec.key} for user {spec.user!r}: add its public key to "
                          f"~{spec.user}/.ssh/authorized_keys on the device")
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) or (
            isinstance(e, asyncssh.DisconnectError) and "timeout" in str(e.reason).lower()):
        return TransientError(f"no SSH answer from {endpoint} within {spec.connect_timeout_s:g} s "
                              "(remote.connect_timeout_s)")
    if isinstance(e, asyncssh.DisconnectError):
        return TransientError(f"{endpoint} closed the SSH connection: {e.reason}")
    if isinstance(e, OSError):
        reason = os.strerror(e.errno) if e.errno else str(e)  # asyncio's own text hides the errno's
        if reconnecting:
            return TransientError(f"cannot reach {endpoint} again: {reason}")
        return InputError(f"cannot reach {endpoint}: {reason} (is the device on and sshd running?)")
    return InputError(f"cannot connect to {endpoint}: {type(e).__name__}: {e}")


def _private_key(asyncssh, spec: RemoteSpec):
    if not spec.key.is_file():
        msg = f"remote.key: private key file {spec.key} not found"
        raise InputError(msg)
    try:
        return asyncssh.read_private_key(str(spec.key))
    except (asyncssh.KeyImportError, OSError) as e:
        hint = ("; compressor never prompts for a passphrase: use a key without one for the device"
                if "assphrase" in str(e) else "")
        msg = f"remote.key: cannot read private key {spec.key}: {e}{hint}"
        raise InputError(msg) from e


class Link:
    """One SSH connection and its SFTP client to one endpoint."""

    def __init__(self, spec: RemoteSpec, endpoint: Endpoint) -> None:
        self.spec, self.endpoint = spec, endpoint
        self.conn = None
        self.sftp = None

    async def open(self, reconnecting: bool = False) -> None:
        """Connect, log in with the key, check the host key strictly, start SFTP (`reconnecting`: after a
        transient failure in a session that had reached the device)."""
        asyncssh = asyncssh_module()
        spec, timeout = self.spec, self.spec.connect_timeout_s
        if not spec.known_hosts.is_file():
            msg = (f"remote.known_hosts: {spec.known_hosts} not found; host keys are checked strictly, so "
                   f"create it with the device's key (e.g. ssh-keyscan -p {self.endpoint.port} {self.endpoint.host})")
            raise InputError(msg)
        key = _private_key(asyncssh, spec)
        try:
            self.conn = await asyncio.wait_for(asyncssh.connect(
                self.endpoint.host, self.endpoint.port, username=spec.user, client_keys=[key],
                known_hosts=str(spec.known_hosts), agent_path=None, password_auth=False, kbdint_auth=False,
                gss_auth=False, host_based_auth=False, config=None, connect_timeout=timeout, login_timeout=timeout,
                keepalive_interval=15, keepalive_count_max=4), 2 * timeout + 5)
            self.sftp = await asyncio.wait_for(self.conn.start_sftp_client(), timeout)
        except Exception as e:
            await self.close()
            raise _connect_error(asyncssh, e, spec, self.endpoint, reconnecting) from e

    def command(self, folder: str, script: str, *args: str) -> str:
        """`cd FOLDER && PYTHON SCRIPT ARGS`: the profile's python may carry its own arguments."""
        python = " ".join(shlex.quote(p) for p in shlex.split(self.spec.python))
        return " ".join([f"cd {shlex.quote(folder)} &&", python, shlex.quote(script), *map(shlex.quote, args)])

    async def run(self, command: str, stdin: str, timeout: float) -> Answer:
        """Run `command` with `stdin` (never empty: asyncssh sends EOF only after some input); TransientError
        when it times out or the connection drops."""
        asyncssh = asyncssh_module()
        try:
            done = await asyncio.wait_for(self.conn.run(command, input=stdin or "\n", check=False), timeout)
        except (asyncio.TimeoutError, TimeoutError) as e:
            msg = f"the runner on {self.endpoint} did not finish within {timeout:.0f} s"
            raise TransientError(msg) from e
        except (asyncssh.Error, OSError) as e:
            raise self._lost(e, "while the runner ran") from e
        signal = done.exit_signal[0] if done.exit_signal else None
        return Answer(done.exit_status, signal, done.stdout or "", done.stderr or "")

    async def sftp_step(self, what: str, coro: Coroutine[Any, Any, Any], size: int = 0) -> Any:
        """One SFTP step under the connect timeout (plus 1 s per MB); a full disk is an InputError."""
        asyncssh = asyncssh_module()
        try:
            return await asyncio.wait_for(coro, self.spec.connect_timeout_s + size / 1e6)
        except asyncssh.SFTPError as e:
            if e.code in LOST_CODES:  # SFTP's own word for a dropped connection
                raise self._lost(e, f"during {what}") from e
            if e.code in NO_SPACE_CODES or "space" in str(e.reason).lower() or "quota" in str(e.reason).lower():
                msg = (f"the device {self.endpoint} has no space left for {what} ({e.reason}): free some space "
                       f"or point remote.workdir at a larger disk")
                raise InputError(msg) from e
            msg = f"{what} on {self.endpoint} failed: {e.reason}"
            raise InputError(msg) from e
        except (asyncio.TimeoutError, TimeoutError) as e:
            msg = f"{what} on {self.endpoint} took longer than {self.spec.connect_timeout_s + size / 1e6:.0f} s"
            raise TransientError(msg) from e
        except (asyncssh.Error, OSError) as e:
            raise self._lost(e, f"during {what}") from e

    def _lost(self, e: BaseException, when: str) -> TransientError:
        return TransientError(f"lost the connection to {self.endpoint} {when}: {type(e).__name__}: {e}")

    async def put(self, local: Path, remote: str) -> None:
        """Upload one file."""
        await self.sftp_step(f"uploading {local.name}", self.sftp.put(str(local), remote), local.stat().st_size)

    async def mkdir(self, remote: str) -> None:
        await self.sftp_step(f"creating {remote}", self.sftp.makedirs(remote, exist_ok=True))

    async def remove_tree(self, remote: str) -> None:
        await self.sftp_step(f"removing {remote}", self.sftp.rmtree(remote, ignore_errors=True))

    async def close(self) -> None:
        """Close SFTP and the connection (no error if they are already gone)."""
        if self.sftp is not None:
            self.sftp.exit()
            self.sftp = None
        if self.conn is not None:
            self.conn.close()
            try:
                await asyncio.wait_for(self.conn.wait_closed(), 5)
            except (asyncio.TimeoutError, TimeoutError, OSError):
                pass
            self.conn = None
