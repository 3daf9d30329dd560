"""Azurite (Blob only) over HTTPS with basic OAuth checks, persisting to a directory so restarts keep data."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from .certs import TlsFiles
from .procs import ManagedProcess

HOST = "127.0.0.1"
ACCOUNT = "devstoreaccount1"
READY_MARKER = "successfully listens on"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Azurite:
    """One Azurite blob service; `start`/`stop` can be repeated and always reuse the same port and data."""

    def __init__(self, *, repo_root: Path, tls: TlsFiles, location: Path, log_dir: Path) -> None:
        self.executable = repo_root / "node_modules" / ".bin" / "azurite-blob"
        if not self.executable.exists():
            raise FileNotFoundError(f"{self.executable} is missing: run `npm ci` (or `make deps`) first")
        self.repo_root = repo_root
        self.tls = tls
        self.location = location
        self.log_dir = log_dir
        self.port = free_port()
        self._process: ManagedProcess | None = None

    @property
    def account_url(self) -> str:
        """Path-style account URL: https://127.0.0.1:<port>/devstoreaccount1."""
        return f"https://{HOST}:{self.port}/{ACCOUNT}"

    @property
    def running(self) -> bool:
        """True while the Azurite process is alive."""
        return self._process is not None and self._process.alive()

    def start(self) -> None:
        """Start Azurite and wait until it listens (raises StackStartError with its output otherwise)."""
        if self.running:
            return
        self.location.mkdir(parents=True, exist_ok=True)
        stdout_path = self.log_dir / "azurite.out"
        offset = stdout_path.stat().st_size if stdout_path.exists() else 0
        argv = [
            str(self.executable),
            "--blobHost", HOST,
            "--blobPort", str(self.port),
            "--cert", str(self.tls.cert),
            "--key", str(self.tls.key),
            "--oauth", "basic",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
            "--location", str(self.location),
        ]  # fmt: skip
        process = ManagedProcess("azurite", argv, log_dir=self.log_dir, cwd=self.repo_root)
        self._process = process

        def listening() -> bool:
            with stdout_path.open("rb") as stdout:
                stdout.seek(offset)
                return READY_MARKER.encode() in stdout.read()

        process.wait_ready(listening, what=f"listening on port {self.port}")

    def stop(self, *, graceful: bool = True) -> None:
        """Stop Azurite: SIGTERM lets it flush its metadata; `graceful=False` kills it like a crash."""
        if self._process is not None:
            self._process.stop(graceful=graceful)
            self._process = None

    def freeze(self) -> None:
        """Suspend Azurite (SIGSTOP): connections are accepted by the kernel but never answered."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume a frozen Azurite (SIGCONT)."""
        if self._process is not None:
            os.kill(self._process.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()
