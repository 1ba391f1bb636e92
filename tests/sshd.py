"""A real SSH server for the remote-measurement tests: asyncssh on 127.0.0.1, port 0, in a thread.

It has a generated host key (written to a known_hosts file), authorises one
generated client key, serves SFTP on the real file system and runs each
requested command in a real subprocess (/bin/sh -c), logging every command, so
connect, upload, run and parse all run for real against ONNX Runtime here.
Knobs for the failure tests: `quota_bytes` (SFTP writes beyond it fail with
ENOSPC, as a full disk does), `kill_measure_after_s` (a running `measure` is
SIGKILLed, as the OOM killer would), `stop()` and `start(port)` (the device goes down, dropping
every connection, and comes back on the same address). Run it by hand as
`python -m tests.sshd --root /tmp/device --profile ort-cpu --out remote.yaml`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

import asyncssh


class QuotaSFTPServer(asyncssh.SFTPServer):
    """SFTP on the real file system; writes past the device's quota fail with ENOSPC like a full disk."""

    def __init__(self, chan, device: TestDevice) -> None:
        super().__init__(chan)
        self.device = device

    def write(self, file_obj, offset: int, data: bytes):
        quota = self.device.quota_bytes
        if quota is not None:
            self.device.written += len(data)
            if self.device.written > quota:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(file_obj, offset, data)


class _Connections(asyncssh.SSHServer):
    """Keeps the device's open connections, so that `stop` drops them as a killed sshd or a lost link does."""

    def __init__(self, device: TestDevice) -> None:
        self.device = device
        self.conn = None

    def connection_made(self, conn) -> None:
        self.conn = conn
        self.device.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self.device.connections.discard(self.conn)


class TestDevice:
    """One SSH server with its keys; `start()` returns its port. `log` lists the commands it ran."""

    __test__ = False  # not a pytest class

    def __init__(self, root: Path, python: str = sys.executable, quota_bytes: int | None = None,
                 kill_measure_after_s: float | None = None, client_key_path: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python, self.quota_bytes, self.kill_measure_after_s = python, quota_bytes, kill_measure_after_s
        self.written = 0
        self.log: list[str] = []
        self.log_file = self.root / "server.log"
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        if client_key_path is None:  # a new client key, or another test device's (a pool shares one key)
            client_key_path = self.root / "client_key"
            asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(client_key_path))
            os.chmod(client_key_path, 0o600)
        self.client_key_path = Path(client_key_path)
        client_key = asyncssh.read_private_key(str(self.client_key_path))
        self.authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        self.workdir = self.root / "work"
        self.workdir.mkdir(exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = 0
        self.children: set[asyncio.subprocess.Process] = set()
        self.connections: set = set()

    # ------------------------------------------------------------ serving

    async def _pump(self, source, write) -> None:
        while chunk := await source.read(65536):
            write(chunk)

    async def _feed(self, process, child) -> None:
        """The client's stdin into the command's, until EOF."""
        try:
            while chunk := await process.stdin.read(65536):
                child.stdin.write(chunk)
                await child.stdin.drain()
            child.stdin.close()
        except (asyncssh.Error, OSError):
            pass

    async def _handle(self, process) -> None:
        command = process.command or ""
        self.log.append(command)
        with self.log_file.open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {process.get_extra_info('username')}: {command}\n")
        child = await asyncio.create_subprocess_exec("/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE,
                                                     stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.children.add(child)
        if self.kill_measure_after_s is not None and command.endswith(" measure"):
            self.loop.call_later(self.kill_measure_after_s, lambda: child.returncode is None and child.kill())
        feed = asyncio.ensure_future(self._feed(process, child))
        try:
            await asyncio.gather(self._pump(child.stdout, process.stdout.write),
                                 self._pump(child.stderr, process.stderr.write))
            status = await child.wait()
        except (asyncssh.Error, OSError):  # the client went away: end the command like sshd's SIGHUP
            if child.returncode is None:
                child.kill()
            await child.wait()
            return
        finally:
            feed.cancel()
            self.children.discard(child)
        if status < 0:
            process.exit_with_signal(signal.Signals(-status).name[3:])
        else:
            process.exit(status)

    async def _start(self, port: int) -> int:
        self.server = await asyncssh.create_server(
            lambda: _Connections(self), "127.0.0.1", port, server_host_keys=[self.host_key],
            authorized_client_keys=self.authorized, process_factory=self._handle, encoding=None,
            sftp_factory=lambda chan: QuotaSFTPServer(chan, self), password_auth=False, kbdint_auth=False,
            allow_scp=False)
        return self.server.sockets[0].getsockname()[1]

    def start(self, port: int | None = None) -> int:
        """Serve on `port` (None: the port it served on before, a free one the first time; a stopped device
        comes back on its old port with the same host key and known_hosts, as after a reboot)."""
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        port = self.port if port is None else port
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(30)
        self.known_hosts = self.write_known_hosts(self.root / "known_hosts", self.host_key)
        return self.port

    def write_known_hosts(self, path: Path, key) -> Path:
        path.write_text(f"[127.0.0.1]:{self.port} {key.export_public_key().decode().strip()}\n")
        return path

    def stop(self) -> None:
        """Go down (a stopped device stays down until `start`; stopping it again does nothing)."""
        if self.server is None:
            return

        async def stop() -> None:  # as a device that goes down: runners killed, connections dropped
            for child in list(self.children):
                if child.returncode is None:
                    child.kill()
            self.server.close()
            for conn in list(self.connections):  # a killed sshd takes its connections with it
                conn.abort()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)

    # ------------------------------------------------------------ profiles

    def remote_section(self, **overrides: object) -> str:
        """The `remote:` YAML lines that reach this server (overrides replace or add fields)."""
        fields = {"host": f"127.0.0.1:{self.port}", "user": "tester", "key": str(self.client_key_path),
                  "known_hosts": str(self.known_hosts), "python": self.python, "workdir": str(self.workdir),
                  "connect_timeout_s": 10, **overrides}
        return "remote:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items() if v is not None)


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted, with a profile (a built-in's fields plus `remote:`) written to --out."""
    from compressor.latency.profiles import load_profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder for keys, known_hosts, the work folder and server.log")
    p.add_argument("--profile", default="ort-cpu", help="built-in profile or YAML the remote profile copies")
    p.add_argument("--out", required=True, help="profile YAML to write")
    args = p.parse_args(argv)
    device = TestDevice(Path(args.root))
    port = device.start()
    base = load_profile(args.profile)
    text = Path(base.source).read_text() if Path(base.source).is_file() else _builtin_text(args.profile)
    Path(args.out).write_text(text.replace(f"name: {base.name}", f"name: {base.name}-remote")
                              + device.remote_section())
    print(f"serving on 127.0.0.1:{port}; profile {args.out}; log {device.log_file}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        device.stop()
    return 0


def _builtin_text(name: str) -> str:
    from importlib import resources

    return (resources.files("compressor.builtin_profiles") / f"{name}.yaml").read_text()


if __name__ == "__main__":
    sys.exit(main())
