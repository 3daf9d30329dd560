"""Optional run metrics for Azure Monitor (Application Insights), on only when a connection string is set.

`APPLICATIONINSIGHTS_CONNECTION_STRING` unset (or empty): `open_telemetry(settings)` is a no-op `Telemetry` and
nothing is imported. Set: it imports the `azure-monitor` extra lazily (if the extra is missing, one warning and
the run goes on) and exports, through the OpenTelemetry SDK's MeterProvider and a periodic reader, to the
resource's ingestion endpoint (`{IngestionEndpoint}/v2.1/track`, table `customMetrics`):

    worker.items          counter    outcome = succeeded | failed | skipped | interrupted
    worker.tokens         counter    token_type = prompt | completion
    worker.requests       counter    Azure OpenAI calls made (attempts)
    worker.retries        counter
    worker.throttled      counter    429s answered by the service
    worker.call.duration  histogram  seconds, one value per successful call (live, exported every
                                     OTEL_METRIC_EXPORT_INTERVAL ms, 60 s by default)
    worker.run.duration   histogram  seconds, one value per run, exit_code = 0 | 1 | 2

The counters are worker.report's OUTCOMES, TOKENS and CALLS, as in the summary line and the manifest.

The counters are recorded once, by `record_run()`, at the end of a run; `close()` then flushes within a
bounded time, so a slow or unreachable ingestion endpoint can never hold the process past the SIGTERM
deadline. The exporter's calls to anything but the connection string's endpoint (statsbeat to Microsoft,
the OneSettings control plane) and its second "SDK stats" exporter are off unless the operator sets their
variables; offline storage (retry files on disk) is off: a job's container is gone after the run.

The connection string carries an instrumentation key: it is never logged, only the ingestion host is.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import structlog

from worker.report import CALLS, OUTCOMES, LatencyHistogram
from worker.settings import OPTIONS_BY_NAME, Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider

    from worker.report import RunStats

log = structlog.get_logger("worker")

CONNECTION_STRING_ENV = OPTIONS_BY_NAME["applicationinsights_connection_string"].env[0]
EXTRA_HINT = "pip install 'aoai-batch-worker[azure-monitor]'"
SERVICE_NAME = "aoai-batch-worker"
FLUSH_SECONDS = 5.0
EXPORT_TIMEOUT_SECONDS = 5.0

# The exporter's own network calls beyond the customer's ingestion endpoint, and its second exporter
# (customer "SDK stats", which flushes from an atexit hook outside our time bound). Off by default; an
# operator who wants them sets the variable to "false".
QUIET_DEFAULTS = {
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
    "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
}


class Telemetry:
    """No telemetry: what a run gets when Azure Monitor is not configured. Every method costs nothing."""

    def attach(self, stats: RunStats) -> None:
        """Export each call latency of this run's stats as it is measured (call before the run starts)."""

    def record_latency(self, seconds: float) -> None:
        """One Azure OpenAI call's latency."""

    def record_run(self, stats: RunStats, duration_s: float, *, exit_code: int | None = None) -> None:
        """The run's counters, once, at its end."""

    def close(self, timeout_s: float = FLUSH_SECONDS) -> bool:
        """Send what is pending and stop; returns False when that did not finish within `timeout_s`."""
        return True


def ingestion_host(connection_string: str) -> str:
    """The host of the connection string's IngestionEndpoint (safe to log), or the global endpoint's."""
    for part in connection_string.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "ingestionendpoint" and value.strip():
            return urlsplit(value.strip()).netloc or "?"
    return "dc.services.visualstudio.com"


_warned_unavailable = False


def open_telemetry(settings: Settings, *, run_id: str | None = None) -> Telemetry:
    """Azure Monitor metrics when APPLICATIONINSIGHTS_CONNECTION_STRING is set, else a no-op. Never raises."""
    global _warned_unavailable  # noqa: PLW0603 - one warning per process, however many runs
    secret = settings.applicationinsights_connection_string
    connection_string = secret.get_secret_value().strip() if secret else ""
    if not connection_string:
        return Telemetry()
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)  # the exporter reads them from the process environment
    try:
        telemetry = AzureMonitorTelemetry(
            connection_string, run_id=run_id, service_name=settings.otel_service_name or SERVICE_NAME
        )
    except ImportError as exc:
        if not _warned_unavailable:
            _warned_unavailable = True
            log.warning(
                "telemetry.unavailable",
                reason=f"{CONNECTION_STRING_ENV} is set but {exc.name or 'the exporter'} is not installed",
                fix=EXTRA_HINT,
            )
        return Telemetry()
    except Exception as exc:  # noqa: BLE001 - telemetry must never stop a run
        # The message is not logged: a parser's complaint could quote the connection string.
        log.warning(
            "telemetry.disabled",
            reason=f"{CONNECTION_STRING_ENV} was rejected ({type(exc).__name__}); expected "
            "InstrumentationKey=<guid>;IngestionEndpoint=https://<region>.in.applicationinsights.azure.com/",
        )
        return Telemetry()
    log.info("telemetry.enabled", exporter="azure-monitor", ingestion_host=ingestion_host(connection_string))
    return telemetry


class _ObservedHistogram(LatencyHistogram):
    """The run's latency histogram, also handing each value to the exporter."""

    def __init__(self, observe: Callable[[float], None]) -> None:
        super().__init__()
        self._observe = observe

    def add(self, seconds: float) -> None:
        super().add(seconds)
        self._observe(seconds)


class AzureMonitorTelemetry(Telemetry):
    """Metrics to Application Insights through azure-monitor-opentelemetry-exporter."""

    def __init__(
        self, connection_string: str, *, run_id: str | None = None, service_name: str = SERVICE_NAME
    ) -> None:
        from azure.monitor.opentelemetry.exporter import AzureMonitorMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource

        from worker import __version__

        exporter = AzureMonitorMetricExporter(
            connection_string=connection_string,
            disable_offline_storage=True,
            timeout=EXPORT_TIMEOUT_SECONDS,  # connect timeout
            read_timeout=EXPORT_TIMEOUT_SECONDS,
            retry_total=2,
            retry_backoff_factor=0.25,
        )
        attributes = {"service.version": __version__, "service.name": service_name}  # cloud_RoleName
        if run_id:
            attributes["service.instance.id"] = run_id  # Application Insights: cloud_RoleInstance
        # The export interval comes from OTEL_METRIC_EXPORT_INTERVAL (ms, default 60 000).
        reader = PeriodicExportingMetricReader(exporter, export_timeout_millis=EXPORT_TIMEOUT_SECONDS * 1000)
        self._provider: MeterProvider = MeterProvider(
            metric_readers=[reader],
            resource=Resource.create(attributes),
            shutdown_on_exit=False,  # close() flushes within a bound; an atexit flush would not be bounded
        )
        meter = self._provider.get_meter("worker", __version__)
        self._items = meter.create_counter("worker.items", unit="{item}", description="Items by outcome")
        self._tokens = meter.create_counter("worker.tokens", unit="{token}", description="Tokens used")
        self._calls = {
            count.name: meter.create_counter(
                f"worker.{count.name}", unit=count.unit, description=count.description
            )
            for count in CALLS
        }
        self._call_duration = meter.create_histogram(
            "worker.call.duration", unit="s", description="Latency of each successful Azure OpenAI call"
        )
        self._run_duration = meter.create_histogram(
            "worker.run.duration", unit="s", description="Duration of a run, by exit code"
        )
        self._closed = False

    def attach(self, stats: RunStats) -> None:
        if stats.latency.count == 0 and not isinstance(stats.latency, _ObservedHistogram):
            stats.latency = _ObservedHistogram(self.record_latency)

    def record_latency(self, seconds: float) -> None:
        self._call_duration.record(seconds)

    def record_run(self, stats: RunStats, duration_s: float, *, exit_code: int | None = None) -> None:
        try:
            for outcome in OUTCOMES:
                self._items.add(getattr(stats, outcome), {"outcome": outcome})
            for kind, used in stats.tokens().items():
                self._tokens.add(used, {"token_type": kind})
            for name, value in stats.counts(*self._calls).items():
                self._calls[name].add(value)
            self._run_duration.record(
                max(0.0, duration_s), {} if exit_code is None else {"exit_code": exit_code}
            )
        except Exception as exc:  # noqa: BLE001 - telemetry must never change a run's outcome
            log.warning("telemetry.record_failed", error=type(exc).__name__)

    def close(self, timeout_s: float = FLUSH_SECONDS) -> bool:
        """force_flush + shutdown in a daemon thread, waited for at most `timeout_s` seconds.

        Past the bound the thread is abandoned (it cannot keep the process alive) and the metrics not yet
        sent are lost: a warning says so.
        """
        if self._closed:
            return True
        self._closed = True
        started = time.monotonic()
        millis = max(1.0, timeout_s * 1000)
        done = threading.Event()

        def flush() -> None:
            try:
                self._provider.force_flush(timeout_millis=millis)
                self._provider.shutdown(timeout_millis=millis)
            except Exception as exc:  # noqa: BLE001 - reported, never raised into the run
                log.warning("telemetry.flush_failed", error=type(exc).__name__)
            finally:
                done.set()

        threading.Thread(target=flush, name="telemetry-flush", daemon=True).start()
        if done.wait(max(0.0, timeout_s)):
            log.info("telemetry.flushed", seconds=round(time.monotonic() - started, 3))
            return True
        log.warning(
            "telemetry.flush_timeout",
            timeout_s=timeout_s,
            detail="Application Insights did not take the run's metrics in time; they are dropped",
        )
        return False
