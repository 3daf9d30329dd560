"""Running the `worker` CLI as a subprocess against the local stack, and reading what it wrote."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.stack import LocalStack

WORKER = str(Path(sys.executable).parent / "worker")


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def summary(self) -> dict[str, Any]:
        last = json.loads(self.stdout.strip().splitlines()[-1])
        assert last["event"] == "run.summary", last
        return last


def run_worker(
    stack: LocalStack,
    *args: str,
    auth: str = "managed-identity",
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> Run:
    environment = {**stack.worker_env(auth), "WORKER_LOG_FORMAT": "json", **(env or {})}
    done = subprocess.run(
        [WORKER, "run", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class Screen:
    returncode: int
    output: str  # what a terminal received, escape sequences included


def run_in_terminal(stack: LocalStack, *args: str, timeout: float = 120) -> Screen:
    """`worker run` with its stdout and stderr on a pseudo-terminal (log format auto: the progress bar
    and the summary table, as a user at a terminal sees them)."""
    environment = {**stack.worker_env("managed-identity"), "COLUMNS": "120", "TERM": "xterm"}
    environment.pop("WORKER_LOG_FORMAT", None)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [WORKER, "run", *args], env=environment, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    received = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the worker exited and closed the terminal
                break
            if not chunk:
                break
            received += chunk
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
    return Screen(returncode, received.decode("utf-8", "replace"))


def start_worker(
    stack: LocalStack, *args: str, auth: str = "managed-identity", env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    environment = {**stack.worker_env(auth), "WORKER_LOG_FORMAT": "json", **(env or {})}
    return subprocess.Popen(
        [WORKER, "run", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


class WatchedWorker:
    """`worker run` whose stdout is read as it is written, so a test can wait on an event the worker
    logged (its own view of the run) rather than on a fake's counters, which run ahead of it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._lines: list[str] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(process.stdout, self._lines), daemon=True),
            threading.Thread(target=self._drain, args=(process.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: IO[str] | None, into: list[str]) -> None:
        assert stream is not None
        with stream:
            for line in stream:
                into.append(line)

    def wait_for_event(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        needle = f'"event": "{name}"'
        while not any(needle in line for line in list(self._lines)):
            exited = self.process.poll() is not None
            assert not exited, f"the worker exited ({self.process.returncode}) without logging {name}"
            assert time.monotonic() < deadline, f"the worker did not log {name} within {timeout} s"
            time.sleep(0.05)

    def finish(self, timeout: float = 180) -> Run:
        try:
            self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        for reader in self._readers:
            reader.join(timeout=30)
        return Run(self.process.returncode, "".join(self._lines), "".join(self._stderr))


def start_watched_worker(stack: LocalStack, *args: str, auth: str = "managed-identity") -> WatchedWorker:
    return WatchedWorker(start_worker(stack, *args, auth=auth))


def finish(process: subprocess.Popen[str], timeout: float = 180) -> Run:
    stdout, stderr = process.communicate(timeout=timeout)
    return Run(process.returncode, stdout, stderr)


def wait_for(stack: LocalStack, stat: str, at_least: int, timeout: float = 60) -> None:
    """Poll the fake Azure OpenAI until its `stat` counter (successes, in_flight, ...) reaches `at_least`."""
    deadline = time.monotonic() + timeout
    while stack.openai.stats()[stat] < at_least:
        assert time.monotonic() < deadline, f"the fake's {stat} stayed below {at_least}"
        time.sleep(0.05)


def run_revoking_tokens_mid_run(stack: LocalStack, *, auth: str, items: int) -> tuple[Run, str]:
    """A run of `items` jsonl lines during which every token issued so far is revoked; returns the sink."""
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"many.jsonl": b"\n".join(batch_line(f"m{i}", f"many {i}") for i in range(items))})
    stack.openai.configure(latency_ms=40)
    process = start_worker(
        stack,
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink),
        "--concurrency",
        "8",
        auth=auth,
    )
    wait_for(stack, "successes", 20)
    stack.identity.revoke_all()
    return finish(process, timeout=120), sink


def new_container(stack: LocalStack, prefix: str = "t") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    stack.blob_service().create_container(name)
    return name


def upload(stack: LocalStack, container: str, files: dict[str, bytes]) -> None:
    client = stack.blob_service().get_container_client(container)
    for name, data in files.items():
        client.upload_blob(name, data, overwrite=True)


def results(stack: LocalStack, container: str, prefix: str = "") -> list[dict[str, Any]]:
    """Every result line under the sink, excluding the worker's own `_` folders."""
    client = stack.blob_service().get_container_client(container)
    records: list[dict[str, Any]] = []
    for blob in client.list_blobs(name_starts_with=prefix or None):
        relative = blob.name[len(prefix) :]
        if relative.startswith("_") or not blob.name.endswith(".results.jsonl"):
            continue
        for line in client.download_blob(blob.name).readall().splitlines():
            records.append(json.loads(line))
    return records


def manifest(stack: LocalStack, container: str, prefix: str, run_id: str) -> dict[str, Any]:
    client = stack.blob_service().get_container_client(container)
    return json.loads(client.download_blob(f"{prefix}_runs/{run_id}.json").readall())


def batch_line(custom_id: str, text: str, **body: Any) -> bytes:
    request = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": text}], **body},
    }
    return json.dumps(request).encode()


def answer_text(record: dict[str, Any]) -> str:
    return str(record["response"]["body"]["choices"][0]["message"]["content"])
