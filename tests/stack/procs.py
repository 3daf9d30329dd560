"""Child processes of the stack: start with output to log files, wait for readiness, stop cleanly."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

START_TIMEOUT_S = 30.0
"""How long a child may take to become ready, in seconds."""
STOP_TIMEOUT_S = 10.0
"""How long a child may take to exit after SIGTERM before it is killed, in seconds."""
_POLL_S = 0.02
_PR_SET_PDEATHSIG = 1


class StackStartError(RuntimeError):
    """A stack process exited or did not become ready in time; the message carries its output."""


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the parent dies (no orphans after a crash).

    Linux ties this to the spawning *thread*, so it is only used from the main thread: a child started
    from e.g. asyncio.to_thread would otherwise be killed when that worker thread exits.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class ManagedProcess:
    """One child process whose stdout/stderr go to `<log_dir>/<name>.out` and `.err`."""

    def __init__(
        self, name: str, argv: list[str], *, log_dir: Path, cwd: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        log_dir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("ab") as stdout, self.stderr_path.open("ab") as stderr:
            self.popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509 - no threads are started before it
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.popen.poll() is None

    def output_tail(self, limit: int = 4000) -> str:
        """The last `limit` characters of the child's stderr and stdout, for error messages."""
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")[-limit:]
                if text.strip():
                    parts.append(f"--- {path.name} ---\n{text}")
        return "\n".join(parts) or "(no output)"

    def wait_ready(
        self, is_ready: Callable[[], bool], *, what: str, timeout_s: float = START_TIMEOUT_S
    ) -> None:
        """Poll `is_ready` until true; raise StackStartError if the child exits or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while not is_ready():
            if not self.alive():
                code = self.popen.returncode
                raise StackStartError(
                    f"{self.name} exited with code {code} before {what}\n{self.output_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StackStartError(
                    f"{self.name}: no {what} within {timeout_s:.0f} s\n{self.output_tail()}"
                )
            time.sleep(_POLL_S)

    def stop(self, *, graceful: bool = True, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (SIGKILL if not `graceful`), SIGKILL after `timeout_s` seconds; returns the exit code."""
        if self.alive():
            if graceful:
                self.popen.terminate()
            else:
                self.popen.kill()
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
