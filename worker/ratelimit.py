"""The client-side budget of one Azure OpenAI deployment: TPM and RPM token buckets plus a shared pause.

Azure enforces a deployment's quota over short windows (RPM over 1 s/10 s, TPM per 10 s at a sixth of the
minute's quota) and charges a request its estimated prompt tokens + max_tokens up front. The buckets here
hold a sixth of a minute's quota and refill continuously, so bursts stay inside what Azure admits. A 429
pauses the whole deployment for the time the service asked, not only the request that got it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

DEFAULT_MAX_TOKENS = 16
WINDOW_FRACTION = 6  # Azure admits a sixth of the per-minute quota per 10 s window


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def estimate_tokens(body: dict[str, Any]) -> int:
    """Tokens Azure's limiter charges a request: ≈ characters/4 of the input, plus max_tokens."""
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    else:
        value = body.get("input")
        chars += len(value) if isinstance(value, str) else sum(len(str(v)) for v in value or ())
    completion = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_MAX_TOKENS
    return (
        math.ceil(chars / 4) + int(completion)
        if isinstance(completion, int | float)
        else math.ceil(chars / 4)
    )


@dataclass
class TokenBucket:
    """A bucket that may go into debt: `reserve` takes now and says how long the taker must wait."""

    per_minute: float
    level: float = field(init=False)
    updated: float = field(init=False, default=-math.inf)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def capacity(self) -> float:
        return self.per_minute / WINDOW_FRACTION

    def reserve(self, amount: float, now: float) -> float:
        """Take `amount`; return the seconds until the bucket is out of debt again (0 = go now)."""
        rate = self.per_minute / 60.0
        if self.updated != -math.inf:
            self.level = min(self.capacity, self.level + (now - self.updated) * rate)
        self.updated = now
        self.level -= min(amount, self.capacity)
        return 0.0 if self.level >= 0 else -self.level / rate


class RateBudget:
    """Admission control for one deployment. `acquire` before each attempt; `pause` on a 429."""

    def __init__(self, *, tpm: int | None, rpm: int | None, clock: Clock | None = None) -> None:
        self._clock = clock or MonotonicClock()
        self._tokens = TokenBucket(tpm) if tpm else None
        self._requests = TokenBucket(rpm) if rpm else None
        self._paused_until = 0.0

    async def acquire(self, tokens: int) -> float:
        """Wait until the request fits the budget; returns the seconds waited."""
        now = self._clock.now()
        delay = max(0.0, self._paused_until - now)
        if self._tokens is not None:
            delay = max(delay, self._tokens.reserve(tokens, now))
        if self._requests is not None:
            delay = max(delay, self._requests.reserve(1, now))
        if delay > 0:
            await self._clock.sleep(delay)
        # A pause announced while this request slept still applies to it.
        while (remaining := self._paused_until - self._clock.now()) > 0:
            delay += remaining
            await self._clock.sleep(remaining)
        return delay

    def pause(self, seconds: float) -> None:
        """The service said to wait: hold every request to this deployment for `seconds`."""
        self._paused_until = max(self._paused_until, self._clock.now() + seconds)


class Budgets:
    """One RateBudget per deployment, created on first use with the configured quota."""

    def __init__(self, *, tpm: int | None, rpm: int | None, clock: Clock | None = None) -> None:
        self._tpm, self._rpm, self._clock = tpm, rpm, clock
        self._by_deployment: dict[str, RateBudget] = {}

    def __getitem__(self, deployment: str) -> RateBudget:
        budget = self._by_deployment.get(deployment)
        if budget is None:
            budget = self._by_deployment[deployment] = RateBudget(
                tpm=self._tpm, rpm=self._rpm, clock=self._clock
            )
        return budget
