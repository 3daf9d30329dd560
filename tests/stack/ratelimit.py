"""Azure OpenAI's quota as sliding windows: RPM over 10 s, TPM over 10 s (Azure) or over 60 s (the
public aoai-api-simulator).

A deployment with `rpm` requests per minute and `tpm` tokens per minute admits at most rpm/6 requests in
any 10 s window and, with `token_window_s` 10 (the default), at most tpm/6 tokens in any 10 s window; with
60, at most tpm tokens in any 60 s window. `x-ratelimit-remaining-*` count what is left of each
dimension's own window. A request's token cost is estimated up front (prompt tokens plus max_tokens), as
Azure's own limiter does.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW_S = 10.0
"""Length of the sliding window of requests (and, by default, of tokens), in seconds."""

UNLIMITED_REMAINING = 1_000_000
"""What the x-ratelimit-remaining-* headers report for a limit that is not configured."""


@dataclass(frozen=True)
class Decision:
    """Outcome of one admission check."""

    admitted: bool
    remaining_requests: int
    """Requests still admissible in the current window (after this one, if admitted)."""
    remaining_tokens: int
    """Tokens still admissible in the current window (after this one, if admitted)."""
    retry_after_ms: int = 0
    """When refused: milliseconds until enough capacity frees up for this request."""
    limit: str = ""
    """When refused: "requests" or "tokens", whichever limit was hit."""


class SlidingWindowLimiter:
    """Admits requests while the last `window_s` seconds stay under the request limit and the last
    `token_window_s` seconds under the token limit."""

    def __init__(self, window_s: float = WINDOW_S, token_window_s: float | None = None) -> None:
        self.window_s = window_s
        self.token_window_s = window_s if token_window_s is None else token_window_s
        self._requests: deque[float] = deque()
        self._events: deque[tuple[float, int]] = deque()  # tokens: (at, cost) over token_window_s
        self._tokens = 0

    def acquire(self, cost: int, *, rpm: int | None, tpm: int | None, now: float) -> Decision:
        """Admit and record a request of `cost` tokens at time `now` (seconds), or say when to retry."""
        requests, events = self._requests, self._events
        while requests and requests[0] <= now - self.window_s:
            requests.popleft()
        while events and events[0][0] <= now - self.token_window_s:
            self._tokens -= events.popleft()[1]
        max_requests = None if rpm is None else max(1, int(rpm * self.window_s / 60))
        max_tokens = None if tpm is None else max(1, int(tpm * self.token_window_s / 60))
        if max_requests is not None and len(requests) + 1 > max_requests:
            wait_s = requests[0] + self.window_s - now
            return self._refused("requests", wait_s, max_requests, max_tokens)
        if max_tokens is not None and self._tokens + cost > max_tokens:
            return self._refused(
                "tokens", self._token_wait_s(cost, max_tokens, now), max_requests, max_tokens
            )
        requests.append(now)
        events.append((now, cost))
        self._tokens += cost
        return Decision(
            admitted=True,
            remaining_requests=self._remaining(len(requests), max_requests),
            remaining_tokens=self._remaining(self._tokens, max_tokens),
        )

    def _token_wait_s(self, cost: int, max_tokens: int, now: float) -> float:
        if cost > max_tokens:
            return self.token_window_s
        excess = self._tokens + cost - max_tokens
        for at, event_cost in self._events:
            excess -= event_cost
            if excess <= 0:
                return at + self.token_window_s - now
        return self.token_window_s

    def _refused(
        self, limit: str, wait_s: float, max_requests: int | None, max_tokens: int | None
    ) -> Decision:
        return Decision(
            admitted=False,
            remaining_requests=self._remaining(len(self._requests), max_requests),
            remaining_tokens=self._remaining(self._tokens, max_tokens),
            retry_after_ms=max(1, math.ceil(wait_s * 1000)),
            limit=limit,
        )

    @staticmethod
    def _remaining(used: int, limit: int | None) -> int:
        return UNLIMITED_REMAINING if limit is None else max(0, limit - used)
