"""Is a deployment answering? A circuit breaker per deployment, so that an outage costs no attempts.

- **Closed** (normal): every attempt goes out. `FAILURES_TO_OPEN` transient failures in a row (5xx,
  408, timeouts, connection or token-endpoint errors; not 429s, which the rate budget handles) open it.
- **Open**: nothing is dispatched except one *probe* at a time, at growing intervals
  (`PROBE_FIRST_SECONDS`, doubling up to `PROBE_MAX_SECONDS`). The first success closes it and every
  waiting item goes out again.
- **Down**: the deployment has failed for longer than `--outage-seconds` since its last success, or it
  asked for a wait longer than the worker may wait (a 429 with a retry-after of hours: a daily quota).
  Every waiting and later attempt raises `DeploymentDown`: the items are left for the next run.

`is_open` lets a caller tell "this item failed while the deployment answers" (its attempt counts) from
"everything fails" (an outage: the attempt does not count).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import structlog

from worker.errors import DeploymentDown

log = structlog.get_logger("worker.health")

FAILURES_TO_OPEN = 5
PROBE_FIRST_SECONDS = 1.0
PROBE_MAX_SECONDS = 15.0


class Circuit:
    """The health of one deployment, shared by every call to it."""

    def __init__(self, deployment: str, *, outage_seconds: float) -> None:
        self.deployment = deployment
        self._outage_seconds = outage_seconds
        self.failures_in_a_row = 0
        self.verified = False
        """At least one call to this deployment has succeeded in this run."""
        self._failing_since: float | None = None
        self._open = False
        self._probe_at = -math.inf
        self._probe_interval = PROBE_FIRST_SECONDS
        self._probing = False
        self._changed = asyncio.Event()
        self.down: DeploymentDown | None = None

    @staticmethod
    def _now() -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:
            return time.monotonic()

    @property
    def is_open(self) -> bool:
        return self._open

    async def admit(self) -> bool:
        """Wait until an attempt may go out; True when it is the probe of an open circuit.

        Raises DeploymentDown once the deployment is out for this run.
        """
        while True:
            if self.down is not None:
                raise self.down
            if not self._open:
                return False
            now = self._now()
            assert self._failing_since is not None
            give_up_at = self._failing_since + self._outage_seconds
            if now >= give_up_at:
                self.give_up(f"has failed for more than {self._outage_seconds:g} s (--outage-seconds)")
                continue
            if not self._probing and now >= self._probe_at:
                self._probing = True
                return True
            wake_at = give_up_at if self._probing else min(give_up_at, self._probe_at)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=max(0.0, wake_at - now))

    def wait_estimate(self) -> float:
        """Seconds until `admit` would let an attempt go (0: now): the next probe of an open circuit,
        its give-up time while a probe is out; inf once it is down."""
        if self.down is not None:
            return math.inf
        if not self._open:
            return 0.0
        now = self._now()
        assert self._failing_since is not None
        give_up_at = self._failing_since + self._outage_seconds
        if now >= give_up_at:
            return 0.0  # `admit` gives up at once
        if self._probing:
            return give_up_at - now
        return max(0.0, self._probe_at - now)

    def answered(self, probe: bool, *, ok: bool) -> None:
        """The deployment answered (`ok`: with a success; else a 429 or a permanent error): it is up."""
        self.verified = self.verified or ok
        self.failures_in_a_row = 0
        self._failing_since = None
        if probe:
            self._probing = False
        if self._open:
            self._open = False
            self._probe_interval = PROBE_FIRST_SECONDS
            log.warning("deployment.recovered", deployment=self.deployment)
            self._changed.set()

    def failed(self, probe: bool, error: str) -> None:
        """A transient failure (never a 429 or a permanent answer)."""
        now = self._now()
        self.failures_in_a_row += 1
        if self._failing_since is None:
            self._failing_since = now
        if probe:
            self._probing = False
            self._probe_interval = min(PROBE_MAX_SECONDS, self._probe_interval * 2)
            self._probe_at = now + self._probe_interval
            self._changed.set()
        elif not self._open and self.failures_in_a_row >= FAILURES_TO_OPEN:
            self._open = True
            self._probe_at = now + self._probe_interval
            log.warning(
                "deployment.unavailable",
                deployment=self.deployment,
                error=error,
                failures=self.failures_in_a_row,
                next_probe_in_s=self._probe_interval,
            )

    def probe_abandoned(self) -> None:
        """The probe ended without an answer either way (cancelled, throttled): let another go."""
        self._probing = False
        self._changed.set()

    def give_up(self, reason: str) -> None:
        """The deployment is out for the rest of this run."""
        if self.down is None:
            self.down = DeploymentDown(self.deployment, reason)
            log.error("deployment.down", deployment=self.deployment, reason=reason)
        self._changed.set()


class Health:
    """One Circuit per deployment, created on first use."""

    def __init__(self, *, outage_seconds: float) -> None:
        self._outage_seconds = outage_seconds
        self._circuits: dict[str, Circuit] = {}

    def __getitem__(self, deployment: str) -> Circuit:
        circuit = self._circuits.get(deployment)
        if circuit is None:
            circuit = self._circuits[deployment] = Circuit(deployment, outage_seconds=self._outage_seconds)
        return circuit

    @property
    def any_verified(self) -> bool:
        return any(circuit.verified for circuit in self._circuits.values())
