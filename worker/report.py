"""Counters of one run, in constant memory: they become the summary line and the run manifest."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_LISTED_PROBLEMS = 1000


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

    def summary(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "held": self.units_held,
            "changed_inputs": self.changed_inputs,
            "requests": self.requests,
            "retries": self.retries,
            "throttled": self.throttled,
            "token_refreshes": self.token_refreshes,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_p50_s": self.latency.percentile(0.5),
            "latency_p95_s": self.latency.percentile(0.95),
            "latency_p99_s": self.latency.percentile(0.99),
            "errors_by_code": dict(self.errors_by_code),
        }
