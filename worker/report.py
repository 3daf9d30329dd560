"""What one run did: its counters (in constant memory), the summary line and the run manifest.

The counters that leave the process are named once, here: `OUTCOMES`, `CALLS` and `TOKENS` are what the
summary line, the manifest and the Azure Monitor metrics (worker.azure_monitor) report.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from worker import __version__
from worker.settings import Settings

MAX_LISTED_PROBLEMS = 1000


class Count(NamedTuple):
    """A RunStats count reported under its own name, and as the metric `worker.<name>`."""

    name: str
    unit: str
    """As an OpenTelemetry unit annotation."""
    description: str


OUTCOMES = ("succeeded", "failed", "skipped", "interrupted", "pending")
"""Where the items this process saw ended, each a RunStats count (the metric: `worker.items` by outcome);
`pending`: with the batch backend, in a live batch or left for the next run by a full enqueued-token quota."""
CALLS = (
    Count("requests", "{request}", "Azure OpenAI calls made"),
    Count("retries", "{retry}", "Calls retried"),
    Count("throttled", "{response}", "429 answers from Azure OpenAI"),
)
"""The Azure OpenAI attempts, those that were retried, and the 429s among them."""
TOKENS = ("prompt", "completion")
"""RunStats.<kind>_tokens: tokens the service counted (the metric: `worker.tokens` by token_type)."""
UNITS = ("units_done", "units_skipped", "units_held", "changed_inputs")
"""Input files (work units) finished, skipped as finished before, held by another process, read again."""


class LatencyHistogram:
    """Log-spaced buckets (≈2.5 % wide) from 1 ms to ~1 h: percentiles within a bucket, flat memory."""

    _GROWTH = 1.025
    _LOWEST = 0.001

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0

    def add(self, seconds: float) -> None:
        index = 0 if seconds <= self._LOWEST else int(math.log(seconds / self._LOWEST, self._GROWTH)) + 1
        self._buckets[index] += 1
        self.count += 1

    def percentile(self, fraction: float) -> float | None:
        if not self.count:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return round(self._LOWEST * self._GROWTH**index, 4)
        return None


@dataclass
class RunStats:
    """What this process did. `total` = items seen; skipped = finalised before or held by another replica."""

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: int = 0
    pending: int = 0
    deferred: int = 0
    """Of `pending`: items not submitted because the Batch enqueued-token quota is full (the next run does)."""
    units_done: int = 0
    units_skipped: int = 0
    units_held: int = 0
    changed_inputs: int = 0
    """Inputs completed earlier whose version changed since: re-read; their recorded ids keep their record."""
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    token_refreshes: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batch_prompt_tokens: int = 0
    """Of prompt_tokens: those answered through the Batch API (billed at the batch price)."""
    batch_completion_tokens: int = 0
    throttle_wait_seconds: float = 0.0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)
    problems_dropped: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def problem(self, **details: Any) -> None:
        """Remember an input problem for the manifest (bounded list; the log has them all)."""
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(details)
        else:
            self.problems_dropped += 1

    def counts(self, *names: str) -> dict[str, int]:
        """The named counts, in that order."""
        return {name: getattr(self, name) for name in names}

    def tokens(self) -> dict[str, int]:
        """Tokens by kind (`TOKENS`)."""
        return {kind: getattr(self, f"{kind}_tokens") for kind in TOKENS}

    def summary(self) -> dict[str, Any]:
        """The counts of the summary line."""
        return {
            **self.counts("total", *OUTCOMES),
            "held": self.units_held,
            **({"deferred": self.deferred} if self.deferred else {}),
            "changed_inputs": self.changed_inputs,
            **self.counts(*(count.name for count in CALLS), "token_refreshes"),
            **{f"{kind}_tokens": used for kind, used in self.tokens().items()},
            "latency_p50_s": self.latency.percentile(0.5),
            "latency_p95_s": self.latency.percentile(0.95),
            "latency_p99_s": self.latency.percentile(0.99),
            "errors_by_code": dict(self.errors_by_code),
        }


@dataclass
class RunResult:
    """How a run ended, with its stats: what the summary line and the manifest are made of."""

    run_id: str
    exit_code: int
    stats: RunStats
    error: str | None = None
    manifest: str | None = None
    """Where the manifest was written."""
    rate_limits: dict[str, Any] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per deployment (worker.pool.Deployment.report): calls, 429s, tokens, limits, where it is."""
    batches: list[dict[str, Any]] = field(default_factory=list)
    """With the batch backend: one entry per batch this run submitted, looked at or collected."""
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def summary(self) -> dict[str, Any]:
        """The fields of the `run.summary` line."""
        return {
            "run_id": self.run_id,
            **self.stats.summary(),
            "exit_code": self.exit_code,
            "duration_s": round((self.ended or time.time()) - self.started, 3),
            "manifest": self.manifest,
            **({"deployments": summary_deployments(self.deployments)} if self.deployments else {}),
            **({"error": self.error} if self.error else {}),
        }


SUMMARY_DEPLOYMENT_FIELDS = ("calls", "throttled", "prompt_tokens", "completion_tokens", "tpm", "rpm")
"""What the summary line shows per deployment (the manifest has every field)."""


def summary_deployments(deployments: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per deployment: calls, 429s, tokens and the limits configured or learned (None: not known)."""
    return {
        label: {name: report[name] for name in SUMMARY_DEPLOYMENT_FIELDS}
        | ({"down": True} if report.get("down") else {})
        for label, report in deployments.items()
    }


def estimated_cost(stats: RunStats, settings: Settings) -> float | None:
    """Tokens this run used × the job's prices per million (tokens answered through the Batch API at the
    batch price); None when no price is configured."""
    online = tokens_cost(
        stats.prompt_tokens - stats.batch_prompt_tokens,
        stats.completion_tokens - stats.batch_completion_tokens,
        settings,
    )
    batch = tokens_cost(stats.batch_prompt_tokens, stats.batch_completion_tokens, settings, batch=True)
    return None if online is None or batch is None else round(online + batch, 6)


def tokens_cost(prompt: int, completion: int, settings: Settings, *, batch: bool = False) -> float | None:
    """The price of so many tokens at the job's prices per million (× `pricing.batch_discount` for the
    Batch API); None when no price is configured."""
    if settings.price_input_per_million is None and settings.price_output_per_million is None:
        return None
    cost = prompt * (settings.price_input_per_million or 0.0)
    cost += completion * (settings.price_output_per_million or 0.0)
    if batch:
        cost *= settings.batch_discount
    return round(cost / 1_000_000, 6)


def manifest(result: RunResult, settings: Settings) -> bytes:
    """The run manifest (`_runs/<run id>.json` under the sink), as JSON."""
    stats = result.stats
    tokens = stats.tokens()
    document = {
        "run_id": result.run_id,
        "worker_version": __version__,
        "started": datetime.fromtimestamp(result.started, UTC).isoformat(),
        "ended": datetime.fromtimestamp(result.ended or time.time(), UTC).isoformat(),
        "exit_code": result.exit_code,
        "error": result.error,
        "source": settings.source,
        "sink": settings.sink,
        "deployment": settings.deployment,
        "auth": settings.auth,
        "backend": settings.backend,
        "counts": stats.counts("total", *OUTCOMES, "deferred", *UNITS),
        "calls": {
            **stats.counts(*(count.name for count in CALLS), "token_refreshes"),
            "throttle_wait_seconds": round(stats.throttle_wait_seconds, 3),
        },
        "tokens": {**tokens, "total": sum(tokens.values())},
        "estimated_cost": estimated_cost(stats, settings),
        "latency_seconds": {
            "p50": stats.latency.percentile(0.5),
            "p90": stats.latency.percentile(0.9),
            "p95": stats.latency.percentile(0.95),
            "p99": stats.latency.percentile(0.99),
        },
        "errors_by_code": dict(stats.errors_by_code),
        "rate_limits": result.rate_limits,
        "deployments": result.deployments,
        **({"batches": result.batches} if settings.backend == "batch" else {}),
        "input_problems": stats.problems,
        "input_problems_not_listed": stats.problems_dropped,
    }
    return json.dumps(document, indent=2).encode()
