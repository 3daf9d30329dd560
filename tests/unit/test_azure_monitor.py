"""worker.azure_monitor against a fake Application Insights ingestion endpoint on 127.0.0.1.

The real azure-monitor-opentelemetry-exporter and OpenTelemetry SDK run unmodified against
tests/stack/app_insights.py (the `ingestion` fixture). Tests that change process-wide state (logging
set-up, audit hooks) run in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.stack.app_insights import METRIC_ENVELOPE, TRACK_PATH, FakeIngestion
from worker import azure_monitor
from worker.azure_monitor import CONNECTION_STRING_ENV, QUIET_DEFAULTS, Telemetry, open_telemetry
from worker.report import LatencyHistogram, RunStats
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """open_telemetry() sets the exporter's quiet defaults in os.environ; put it back after each test."""
    saved = dict(os.environ)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(azure_monitor, "_warned_unavailable", False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def finished_run() -> RunStats:
    stats = RunStats()
    stats.total, stats.succeeded, stats.failed, stats.skipped, stats.interrupted = 20, 11, 2, 4, 3
    stats.prompt_tokens, stats.completion_tokens = 1234, 567
    stats.requests, stats.retries, stats.throttled = 19, 6, 4
    return stats


# ---- no connection string: nothing happens -------------------------------------------------------------


@pytest.mark.parametrize("environ", [{}, {CONNECTION_STRING_ENV: ""}, {CONNECTION_STRING_ENV: "  "}])
def test_without_a_connection_string_telemetry_is_a_no_op(environ: dict[str, str]) -> None:
    quiet_before = {name: os.environ.get(name) for name in QUIET_DEFAULTS}
    found = open_telemetry(load_settings({}, environ))
    assert type(found) is Telemetry
    stats = finished_run()
    latency = stats.latency
    found.attach(stats)
    assert stats.latency is latency
    found.record_run(stats, 1.0, exit_code=0)
    assert found.close() is True
    assert {name: os.environ.get(name) for name in QUIET_DEFAULTS} == quiet_before


def test_without_a_connection_string_nothing_is_imported() -> None:
    """Zero cost: importing worker.azure_monitor and running the no-op imports neither OpenTelemetry nor the exporter."""
    script = textwrap.dedent(
        """
        import sys
        from worker.report import RunStats
        from worker.azure_monitor import open_telemetry
        from worker.settings import load_settings
        t = open_telemetry(load_settings({}))
        stats = RunStats()
        t.attach(stats)
        stats.latency.add(0.5)
        t.record_run(stats, 1.0, exit_code=0)
        t.close()
        loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry", "azure.monitor")))
        print(type(t).__name__, loaded)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != CONNECTION_STRING_ENV}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Telemetry []"


# ---- metrics arrive -----------------------------------------------------------------------------------


def test_run_metrics_arrive_at_the_ingestion_endpoint(ingestion: FakeIngestion) -> None:
    found = open_telemetry(
        load_settings({}, {CONNECTION_STRING_ENV: ingestion.connection_string}), run_id="job-exec-42"
    )
    assert isinstance(found, azure_monitor.AzureMonitorTelemetry)
    stats = finished_run()
    found.attach(stats)
    for seconds in (0.2, 0.4, 1.5):
        stats.latency.add(seconds)  # what the caller does after each successful call
    found.record_run(stats, 12.5, exit_code=1)
    assert found.close(timeout_s=10) is True

    assert ingestion.requests and set(ingestion.requests) == {("POST", TRACK_PATH)}
    assert {e["iKey"] for e in ingestion.envelopes} == {ingestion.instrumentation_key}
    assert {e["name"] for e in ingestion.envelopes} == {METRIC_ENVELOPE}
    tags = ingestion.envelopes[0]["tags"]
    assert tags["ai.cloud.role"] == "aoai-batch-worker"
    assert tags["ai.cloud.roleInstance"] == "job-exec-42"

    for outcome, count in {"succeeded": 11, "failed": 2, "skipped": 4, "interrupted": 3}.items():
        assert ingestion.total("worker.items", outcome=outcome) == count, outcome
    assert ingestion.total("worker.tokens", token_type="prompt") == 1234
    assert ingestion.total("worker.tokens", token_type="completion") == 567
    assert ingestion.total("worker.requests") == 19
    assert ingestion.total("worker.retries") == 6
    assert ingestion.total("worker.throttled") == 4

    [(latency, _)] = ingestion.points("worker.call.duration")
    assert latency["count"] == 3
    assert latency["value"] == pytest.approx(2.1)  # Application Insights keeps sum, count, min, max
    assert (latency["min"], latency["max"]) == (pytest.approx(0.2), pytest.approx(1.5))
    [(run, properties)] = ingestion.points("worker.run.duration")
    assert run["value"] == pytest.approx(12.5)
    assert properties == {"exit_code": "1"}
    # The run's own histogram still works: the manifest's percentiles come from it.
    assert isinstance(stats.latency, LatencyHistogram)
    assert stats.latency.count == 3
    assert stats.latency.percentile(1.0) == pytest.approx(1.5, rel=0.03)


def test_call_latencies_are_exported_while_the_run_goes_on(
    ingestion: FakeIngestion, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")  # ms; 60 s by default
    found = open_telemetry(load_settings({}, {CONNECTION_STRING_ENV: ingestion.connection_string}))
    stats = RunStats()
    found.attach(stats)
    stats.latency.add(0.25)
    stats.latency.add(0.75)
    try:
        assert ingestion.wait_until(lambda: bool(ingestion.points("worker.call.duration")), timeout=10)
        assert not ingestion.points("worker.items")  # the counters come at the end of the run
    finally:
        found.record_run(stats, 1.0, exit_code=0)
        assert found.close(timeout_s=10)
    assert sum(p["count"] for p, _ in ingestion.points("worker.call.duration")) == 2
    assert ingestion.total("worker.call.duration") == pytest.approx(1.0)
    assert ingestion.total("worker.items", outcome="succeeded") == 0


def test_attach_leaves_a_histogram_with_values_alone(ingestion: FakeIngestion) -> None:
    found = open_telemetry(load_settings({}, {CONNECTION_STRING_ENV: ingestion.connection_string}))
    stats = RunStats()
    stats.latency.add(0.1)
    before = stats.latency
    found.attach(stats)
    assert stats.latency is before
    assert found.close(timeout_s=10)


# ---- failure modes: the run never waits long and never breaks -----------------------------------------


def test_close_is_bounded_when_ingestion_hangs(ingestion: FakeIngestion) -> None:
    ingestion.mode = "hang"
    found = open_telemetry(load_settings({}, {CONNECTION_STRING_ENV: ingestion.connection_string}))
    found.record_run(finished_run(), 3.0, exit_code=0)
    with structlog.testing.capture_logs() as events:
        started = time.monotonic()
        assert found.close(timeout_s=1.0) is False
        took = time.monotonic() - started
    assert 0.9 <= took < 2.0
    assert [e["event"] for e in events] == ["telemetry.flush_timeout"]
    assert events[0]["log_level"] == "warning"
    assert ingestion.requests == [("POST", TRACK_PATH)]  # it did try
    assert found.close() is True  # closing twice is harmless


def test_rejected_metrics_do_not_break_the_run(ingestion: FakeIngestion) -> None:
    ingestion.mode = "reject"
    found = open_telemetry(load_settings({}, {CONNECTION_STRING_ENV: ingestion.connection_string}))
    found.record_run(finished_run(), 3.0, exit_code=0)
    assert found.close(timeout_s=10) is True
    assert ingestion.requests  # sent, refused, dropped (no offline storage in a job)
    assert not ingestion.envelopes


def test_missing_extra_warns_once_and_continues(
    ingestion: FakeIngestion, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `None` in sys.modules makes the import fail exactly as when the package is not installed.
    monkeypatch.setitem(sys.modules, "azure.monitor.opentelemetry.exporter", None)
    environ = {CONNECTION_STRING_ENV: ingestion.connection_string}
    with structlog.testing.capture_logs() as events:
        first, second = open_telemetry(load_settings({}, environ)), open_telemetry(load_settings({}, environ))
    assert type(first) is Telemetry and type(second) is Telemetry
    assert len(events) == 1
    assert events[0]["event"] == "telemetry.unavailable"
    assert events[0]["log_level"] == "warning"
    assert "pip install 'aoai-batch-worker[azure-monitor]'" in events[0]["fix"]
    assert ingestion.instrumentation_key not in repr(events)
    first.record_run(finished_run(), 1.0)
    assert first.close()
    assert not ingestion.requests


@pytest.mark.parametrize(
    "connection_string",
    [
        "InstrumentationKey=not-a-guid-but-a-secret-7f3a;IngestionEndpoint=http://127.0.0.1:9/",
        "IngestionEndpoint=http://127.0.0.1:9/",
        "garbage-secret-7f3a",
    ],
)
def test_a_bad_connection_string_disables_telemetry_without_echoing_it(connection_string: str) -> None:
    with structlog.testing.capture_logs() as events:
        found = open_telemetry(load_settings({}, {CONNECTION_STRING_ENV: connection_string}))
    assert type(found) is Telemetry
    assert [e["event"] for e in events] == ["telemetry.disabled"]
    assert "secret" not in repr(events)
    assert "not-a-guid" not in repr(events)


def test_ingestion_host_is_all_that_is_logged_of_the_connection_string() -> None:
    key = str(uuid.uuid4())
    assert (
        azure_monitor.ingestion_host(f"InstrumentationKey={key};IngestionEndpoint=https://x.example/")
        == "x.example"
    )
    assert (
        azure_monitor.ingestion_host(
            f"instrumentationkey={key};ingestionendpoint=http://127.0.0.1:5/;LiveEndpoint=y"
        )
        == "127.0.0.1:5"
    )
    assert azure_monitor.ingestion_host(f"InstrumentationKey={key}") == "dc.services.visualstudio.com"


# ---- subprocesses: the worker's real logging set-up, and a network guard ------------------------------

GUARDED_RUN = """
import json, os, socket, sys, time

contacted = []

def guard(event, args):
    # Every name lookup and connection, whichever library makes it; anything not on loopback is refused
    # before it leaves the process (the audit hook runs before the lookup or connect happens).
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = str(args[1][0])
    else:
        return
    contacted.append(host)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise OSError(f"test guard: refused to reach {host}")

sys.addaudithook(guard)

if os.environ.get("FAST_CONTROL_PLANE"):
    import random  # the control-plane worker first waits random.uniform(5, 15) s; make that 0.05 s
    random.uniform = lambda a, b: 0.05

import logging
from worker import logs
logs.configure(json_lines=True, verbose=True)
logging.getLogger().setLevel(logging.DEBUG)  # everything the SDKs would ever say, on stderr
from worker.report import RunStats
from worker.azure_monitor import open_telemetry
from worker.settings import load_settings

t = open_telemetry(load_settings({}), run_id="guarded")
stats = RunStats()
t.attach(stats)
stats.latency.add(0.3)
stats.succeeded = 5
t.record_run(stats, 2.0, exit_code=0)
time.sleep(float(os.environ.get("LINGER", "0")))  # let background workers (control plane, statsbeat) act
ok = t.close(timeout_s=5)

from azure.monitor.opentelemetry.exporter._configuration._state import get_configuration_manager
from azure.monitor.opentelemetry.exporter.statsbeat._state import is_statsbeat_enabled
from azure.monitor.opentelemetry.exporter.statsbeat.customer._state import get_customer_stats_manager

print(json.dumps({
    "enabled": type(t).__name__ == "AzureMonitorTelemetry",
    "closed": ok,
    "contacted": sorted(set(contacted)),
    "statsbeat": is_statsbeat_enabled(),
    "control_plane": get_configuration_manager() is not None,
    "sdk_stats": get_customer_stats_manager().is_enabled,
}))
"""


def guarded_run(ingestion: FakeIngestion, **env: str) -> tuple[dict[str, Any], str]:
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ingestion.environ(), **env}
    done = subprocess.run(
        [sys.executable, "-c", GUARDED_RUN],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *_, last = done.stdout.strip().splitlines()
    return json.loads(last), done.stdout + done.stderr


def test_only_the_ingestion_endpoint_is_contacted_and_no_secret_is_logged(ingestion: FakeIngestion) -> None:
    result, output = guarded_run(ingestion, LINGER="2")
    assert result == {
        "enabled": True,
        "closed": True,
        "contacted": ["127.0.0.1"],
        "statsbeat": False,
        "control_plane": False,
        "sdk_stats": False,
    }
    assert ingestion.total("worker.items", outcome="succeeded") == 5
    assert set(ingestion.requests) == {("POST", TRACK_PATH)}
    assert ingestion.instrumentation_key not in output
    assert '"event": "telemetry.enabled"' in output
    assert '"ingestion_host": "127.0.0.1:' in output


def test_the_guard_sees_what_the_defaults_switch_off(ingestion: FakeIngestion) -> None:
    """With the control plane left on, the exporter reaches for Microsoft's settings service (after a
    random 5-15 s start-up delay, shortened here): the guard refuses it, so nothing leaves the machine,
    and reports it, which shows the test above would have caught it."""
    result, _ = guarded_run(
        ingestion, APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED="false", FAST_CONTROL_PLANE="1", LINGER="1"
    )
    assert result["control_plane"] is True
    assert "settings.sdk.monitor.azure.com" in result["contacted"]
    assert ingestion.total("worker.items", outcome="succeeded") == 5  # the metrics still went through


@pytest.mark.parametrize("mode", ["reject", "error"])
def test_no_secret_is_logged_when_ingestion_refuses(ingestion: FakeIngestion, mode: str) -> None:
    ingestion.mode = mode
    result, output = guarded_run(ingestion)
    assert result["enabled"] and result["closed"]
    assert ingestion.requests
    assert ingestion.instrumentation_key not in output
