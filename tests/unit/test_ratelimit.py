"""The budget on virtual time: pacing, learning from headers, AIMD, the window on requests in flight.

Simulations run many concurrent tasks against the fake Azure OpenAI's own sliding-window limiter
(tests/stack/ratelimit.py) on a virtual clock: deterministic, instant, no wall-clock assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tests.stack.ratelimit import SlidingWindowLimiter
from worker.ratelimit import (
    CEILING_DECREASE_FACTOR,
    DECREASE_FACTOR,
    GUARD_SECONDS,
    INITIAL_WINDOW,
    LATENCY_HEADROOM,
    MAX_ESTIMATE,
    MIN_REQUESTS_PER_MINUTE,
    MIN_WINDOW,
    PROBE_FRACTION,
    PROBE_PER_SECOND,
    RECOVER_SECONDS,
    WINDOW_SLACK,
    Budgets,
    RateBudget,
    estimate_tokens,
)

from .virtual_time import Deadlock, LoopClock, run_virtual


def budget(**kwargs: object) -> RateBudget:
    return RateBudget(clock=LoopClock(), **kwargs)  # type: ignore[arg-type]


def now() -> float:
    return asyncio.get_running_loop().time()


async def turn(b: RateBudget, tokens: int) -> float:
    """One attempt of `tokens` that is admitted and answers at once; the seconds it waited for its turn."""
    async with b.admit(tokens) as permit:
        return permit.waited


class Throttled(Exception):
    """The simulated deployment answered 429 (the budget was told through `permit.throttled`)."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__("429")
        self.retry_after_ms = retry_after_ms


def headers(remaining_tokens: int, remaining_requests: int) -> dict[str, str]:
    return {
        "x-ratelimit-remaining-tokens": str(remaining_tokens),
        "x-ratelimit-remaining-requests": str(remaining_requests),
    }


def max_in_window(starts: list[tuple[float, float]], window: float = 10.0) -> float:
    """The most `cost` that started within any `window` seconds (Azure's sliding window)."""
    worst, total, left = 0.0, 0.0, 0
    for at, cost in starts:
        total += cost
        while starts[left][0] <= at - window:
            total -= starts[left][1]
            left += 1
        worst = max(worst, total)
    return worst


# ---- estimate -------------------------------------------------------------------------------------


def test_estimate_is_chars_over_four_plus_max_tokens() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
    assert estimate_tokens(body) == 200
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]}
    assert estimate_tokens(parts) == 10 + 16
    assert estimate_tokens({"input": "z" * 8}) == 2 + 16
    assert estimate_tokens({"input": [[1, 2, 3], [4]]}) == 4 + 16  # token ids count one each


ODD_LEAVES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    7,
    10**30,
    10**400,
    -(10**400),
    0.5,
    -2.5,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "text",
    "x\ud800",
    "ünï 🙂",
]
SHAPED_KEYS = ["messages", "input", "max_tokens", "max_completion_tokens", "content", "text", "role", "type"]


def odd_json(rng: random.Random, depth: int = 0) -> object:
    """Any JSON-shaped value (as json.loads gives, NaN and huge numbers included), biased to the
    keys the estimate looks at."""
    roll = rng.random()
    if depth >= 4 or roll < 0.45:
        return rng.choice(ODD_LEAVES)
    if roll < 0.75:
        return [odd_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [*rng.sample(SHAPED_KEYS, rng.randint(0, 4)), f"k{rng.randint(0, 9)}"]
    return {key: odd_json(rng, depth + 1) for key in keys}


def test_the_estimate_never_raises_for_any_json_shaped_body() -> None:
    rng = random.Random(11)
    for _ in range(20_000):
        body = odd_json(rng)
        if not isinstance(body, dict):
            body = {rng.choice(SHAPED_KEYS): body}
        estimate = estimate_tokens(body)
        assert isinstance(estimate, int), body
        assert 0 <= estimate <= MAX_ESTIMATE, body


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": float("nan")},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": float("inf")},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**400},
        {"messages": "a string"},
        {"input": 123},
        {"input": [None, 1.5, {"a": 1}]},
    ],
)
def test_the_estimate_of_bodies_that_used_to_crash_it(body: dict[str, object]) -> None:
    assert 0 <= estimate_tokens(body) <= MAX_ESTIMATE


# ---- configured limits ----------------------------------------------------------------------------


def test_rpm_is_paced_evenly_and_never_exceeds_a_window() -> None:
    async def main() -> list[tuple[float, float]]:
        b = budget(tpm=None, rpm=60)  # 10 per 10 s
        starts = []
        for _ in range(40):
            await turn(b, 1)
            starts.append((now(), 1.0))
        return starts

    starts = run_virtual(main())
    assert max_in_window(starts) <= 10
    window = 10 + GUARD_SECONDS
    assert all(
        later[0] - first[0] >= window - 1e-9 for first, later in zip(starts, starts[10:], strict=False)
    )
    assert starts[-1][0] < 4 * window  # ... and no slower than 10 per guarded window
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(starts)]
    assert max(gaps) < 2.1  # spread out, not 10 at once then a 10 s gap


def test_tpm_uses_the_quota_less_the_guard_without_exceeding_any_window() -> None:
    rng = random.Random(1)

    async def main() -> list[tuple[float, float]]:
        b = budget(tpm=60_000, rpm=None)  # 10,000 tokens per 10 s
        starts: list[tuple[float, float]] = []

        async def one(cost: int) -> None:
            await turn(b, cost)
            starts.append((now(), float(cost)))

        await asyncio.gather(*(one(rng.randint(50, 500)) for _ in range(2000)))
        return sorted(starts)

    starts = run_virtual(main())
    assert max_in_window(starts) <= 10_000
    spent = sum(cost for _, cost in starts)
    rate_per_minute = spent / (starts[-1][0] - starts[0][0]) * 60
    # The guard costs 2 %; requests of uneven size leave a little of a window unused.
    assert rate_per_minute >= 60_000 * 10 / (10 + GUARD_SECONDS) * 0.98


def test_a_429_pause_holds_every_request() -> None:
    async def main() -> tuple[list[float], float]:
        b = budget(tpm=None, rpm=None)
        b.pause(2.5)
        waited = await asyncio.gather(turn(b, 10), turn(b, 10))
        return waited, await turn(b, 10)

    waited, later = run_virtual(main())
    assert waited == [2.5, 2.5]
    assert later == 0


def test_a_pause_announced_while_pacing_requeues_the_sleeper() -> None:
    async def main() -> tuple[float, float]:
        b = budget(tpm=None, rpm=60)
        for _ in range(2):
            await turn(b, 1)  # the next one must wait ~1 s
        sleeper = asyncio.create_task(turn(b, 1))
        await asyncio.sleep(0.5)
        b.pause(5.0)
        await sleeper
        return now(), sleeper.result()

    at, waited = run_virtual(main())
    assert at >= 5.5  # not before the pause ended
    assert waited >= 5.0


# ---- learning from headers ------------------------------------------------------------------------


def test_until_the_window_is_told_the_limit_is_the_lower_reading_of_remaining_plus_own_usage() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        for cost in (300, 200):
            async with b.admit(cost) as permit:
                pass
        # The server had seen both (500 tokens, 2 requests) and says 9,500 tokens / 98 requests remain:
        # 60,000 a minute if that counts 10 s, 10,000 if it counts a minute. Both fit the data so far.
        permit.observe(headers(9_500, 98))
        return b

    b = run_virtual(main())
    assert b.tokens.counts is None
    assert b.tokens.learned == 10_000
    assert b.requests.learned == 100


def test_remaining_that_comes_back_after_10_s_is_read_as_a_10_s_window() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        server = SlidingWindowLimiter()  # tokens over 10 s: 10,000 per window
        for _ in range(40):  # 200 tokens every 0.5 s (24,000 a minute) for 20 s
            async with b.admit(200) as permit:
                decision = server.acquire(200, rpm=None, tpm=60_000, now=now())
                permit.observe(headers(decision.remaining_tokens, decision.remaining_requests))
            await asyncio.sleep(0.5)
        return b

    b = run_virtual(main())
    assert b.tokens.counts == 10
    assert b.tokens.learned == pytest.approx(60_000, rel=0.02)


def test_remaining_that_never_goes_down_is_not_read_as_a_minute_from_the_first_seconds() -> None:
    # A quota far larger than this process's use (or a gateway reporting a constant): `remaining` stays
    # at 1,000,000 however much is sent. Read as a minute, that would pace at 1,000,000 tokens a minute
    # until 10 s of own usage had aged; 10 s is told as soon as ten requests show it does not go down.
    async def main() -> tuple[RateBudget, float]:
        b = budget(tpm=None, rpm=None)
        for _ in range(30):  # 30 requests of 200 tokens within the first second
            async with b.admit(200) as permit:
                permit.observe(headers(1_000_000, 1_000_000))
            await asyncio.sleep(0.03)
        return b, now()

    b, elapsed = run_virtual(main())
    assert elapsed < 2.0
    assert b.tokens.counts == 10
    assert b.tokens.learned is not None and b.tokens.learned >= 6_000_000


async def others_burst_then_self(
    b: RateBudget, limiter: SlidingWindowLimiter
) -> list[tuple[float, float | None]]:
    """Others fill most of a 10 s window at once; this process sends 200 tokens every 2.5 s for 15 s
    (as its pacing allows). Returns (time, what `remaining` was read to count) after each request."""
    limiter.acquire(8_000, rpm=None, tpm=60_000, now=now())
    seen = []
    start = now()
    while now() - start < 15:
        async with b.admit(200) as permit:
            decision = limiter.acquire(200, rpm=None, tpm=60_000, now=now())
            permit.observe(headers(decision.remaining_tokens, decision.remaining_requests))
        seen.append((now() - start, b.tokens.counts))
        await asyncio.sleep(2.5)
    return seen


@pytest.mark.parametrize(("started_before", "told"), [(0.0, 10.0), (65.0, None)])
def test_remaining_that_comes_back_in_the_first_minute_is_read_as_ten_seconds(
    started_before: float, told: float | None
) -> None:
    # Replicas started together: the others' start-up burst leaves little, and 10 s later it has aged
    # out and `remaining` is back, before any of this process's own usage could tell the window. Over a
    # minute, what others used cannot leave the window within a minute of this process's first request:
    # 10 s. Later in a run it can (others' old usage ages out of a minute): nothing is told from that.
    async def main() -> list[tuple[float, float | None]]:
        b = budget(tpm=None, rpm=None)
        if started_before:
            await turn(b, 200)
            await asyncio.sleep(started_before)
        return await others_burst_then_self(b, SlidingWindowLimiter())

    seen = run_virtual(main())
    assert all(counts is None for at, counts in seen if at < 10)
    assert seen[-1][1] == told


def test_a_429_asking_to_wait_past_10_s_is_not_overruled_by_remaining() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        await throttle(b, 100, {"retry-after": "30"})  # only a minute-long window asks that
        await others_burst_then_self(b, SlidingWindowLimiter())
        return b

    assert run_virtual(main()).tokens.counts == 60


def test_a_replica_that_started_before_its_peers_ramped_up_still_tells_the_window() -> None:
    # Its first samples saw the deployment idle; then the peers took most of it. Compared with those first
    # samples, its aged usage grows while what remains fell (the peers' doing): no answer. It compares
    # with samples taken after the fall instead, and tells 10 s once its own usage ages while `remaining`
    # holds (else it would stay on the minute reading, far below its share, for a minute or more).
    async def main() -> RateBudget:
        limiter = SlidingWindowLimiter()
        b = budget(tpm=None, rpm=None)

        async def peers() -> None:
            await asyncio.sleep(12)
            while True:  # 700 tokens a second: 7,000 of the 10,000 a window admits
                limiter.acquire(100, rpm=None, tpm=60_000, now=now())
                await asyncio.sleep(1 / 7)

        task = asyncio.create_task(peers())
        while now() < 50:
            async with b.admit(200) as permit:
                decision = limiter.acquire(200, rpm=None, tpm=60_000, now=now())
                permit.observe(headers(decision.remaining_tokens, decision.remaining_requests))
            await asyncio.sleep(1)
        task.cancel()
        return b

    assert run_virtual(main()).tokens.counts == 10


def test_a_refused_request_is_not_counted_as_sent() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        await throttle(b, 100)
        async with b.admit(200) as permit:
            permit.observe(headers(9_800, 98))  # the server counted only this one: 200 tokens, 1 request
        return b

    b = run_virtual(main())
    assert b.tokens.learned == 10_000  # the lower reading: 9,800 remaining + 200 sent
    assert b.requests.learned == 99


def test_a_limit_header_is_taken_as_the_per_minute_limit() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        async with b.admit(100) as permit:
            permit.observe({"x-ratelimit-limit-tokens": "120000", "x-ratelimit-remaining-tokens": "5"})
        return b

    assert run_virtual(main()).tokens.learned == 120_000


def test_unusable_headers_teach_nothing() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        async with b.admit(100) as permit:
            permit.observe({"x-ratelimit-remaining-tokens": "-1", "x-ratelimit-remaining-requests": "n/a"})
        return b

    b = run_virtual(main())
    assert b.tokens.learned is None
    assert b.requests.learned is None


def test_a_configured_limit_wins_over_headers() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=6_000, rpm=None)
        async with b.admit(100) as permit:
            permit.observe(headers(1_000_000, 1_000_000))
        return b

    assert run_virtual(main()).tokens.limit(0) == 6_000


# ---- AIMD -----------------------------------------------------------------------------------------


async def throttle(b: RateBudget, cost: int = 100, response_headers: dict[str, str] | None = None) -> None:
    async with b.admit(cost) as permit:
        await asyncio.sleep(0.1)
        permit.throttled(response_headers or {})


def test_a_429_with_no_known_limit_cuts_the_rate_then_it_grows_back_linearly() -> None:
    async def main() -> list[float | None]:
        b = budget(tpm=None, rpm=None)
        for _ in range(99):
            async with b.admit(100):
                await asyncio.sleep(0.1)  # 1,000 tokens/s = 60,000 per minute for ~10 s
        await throttle(b)
        seen = [b.tokens.limit(now())]
        await asyncio.sleep(10)
        seen.append(b.tokens.limit(now()))
        return seen

    cut, later = run_virtual(main())
    # The last 10 s held 60,000 a minute when the 429 came: the ceiling, cut to 90 % of it
    assert cut == pytest.approx(CEILING_DECREASE_FACTOR * 60_000, rel=0.02)
    # ... back to 97 % of it in 3 s, then probing beyond it by 0.3 % of it a second
    assert later == pytest.approx(
        60_000 * (PROBE_FRACTION + PROBE_PER_SECOND * (10 - RECOVER_SECONDS)), rel=0.02
    )


def test_after_a_429_the_rate_returns_to_the_known_limit() -> None:
    async def main() -> list[float | None]:
        b = budget(tpm=60_000, rpm=None)
        await throttle(b, 100)  # e.g. another client shares the quota
        seen = [b.tokens.limit(now())]
        await asyncio.sleep(60)
        seen.append(b.tokens.limit(now()))
        return seen

    cut, later = run_virtual(main())
    assert cut is not None
    assert cut < 60_000
    assert later == 60_000


# ---- what a 429 may not teach ---------------------------------------------------------------------


def test_a_first_429_saying_nothing_remains_does_not_teach_a_limit_of_zero() -> None:
    async def main() -> tuple[RateBudget, list[float]]:
        b = budget(tpm=None, rpm=None)
        await throttle(b, 500, headers(0, 0))  # the very first answer: the window is full (others use it)
        b.pause(1.0)  # what the 429's retry-after asks
        starts = []
        for _ in range(30):
            async with b.admit(500) as permit:  # raised ZeroDivisionError before any request was sent
                starts.append(now())
                await asyncio.sleep(0.1)
                permit.observe(headers(9_500, 98))
        return b, starts

    b, starts = run_virtual(main())
    assert len(starts) == 30
    assert b.tokens.learned is not None and b.tokens.learned >= 6 * 500
    assert b.requests.learned is not None and b.requests.learned >= MIN_REQUESTS_PER_MINUTE
    # Paced at what the successes taught (at least 10,000 tokens a minute: 20 of these), not at zero.
    assert starts[-1] - starts[0] < 30 * 0.1 + 90


def test_a_429_saying_nothing_remains_after_successes_keeps_what_they_taught() -> None:
    async def main() -> tuple[float | None, float | None]:
        b = budget(tpm=None, rpm=None)
        async with b.admit(100) as permit:
            permit.observe(headers(9_900, 99))
        before = b.tokens.learned
        for _ in range(3):
            await throttle(b, 100, headers(0, 0))
        return before, b.tokens.learned

    before, after = run_virtual(main())
    assert before == 10_000
    assert after == before  # "nothing remains now" says the window is full, not how big it is


def test_a_first_429_without_rate_headers_does_not_cut_the_pace_to_nothing() -> None:
    async def main() -> tuple[RateBudget, list[float]]:
        b = budget(tpm=None, rpm=None)
        await throttle(b, 500)  # behind a gateway: no x-ratelimit-* headers, nothing sent before it
        b.pause(1.0)
        starts = []
        for _ in range(60):
            async with b.admit(500) as permit:
                starts.append(now())
                await asyncio.sleep(0.1)
                permit.observe({})
        return b, starts

    b, starts = run_virtual(main())
    # It used to pace at 1 token and 1 request a minute from here on: one request every 10 s.
    assert starts[-1] - starts[0] < 60 * 0.1 + 10
    for dimension in (b.tokens, b.requests):
        pace = dimension.limit(starts[-1])
        assert pace is None or pace >= MIN_REQUESTS_PER_MINUTE * 500


def test_a_cut_never_goes_below_a_few_requests_a_minute() -> None:
    async def main() -> tuple[float | None, float | None]:
        b = budget(tpm=None, rpm=None)
        async with b.admit(1_000):
            await asyncio.sleep(0.1)
        await asyncio.sleep(9.5)  # one small request in the window: 0.7 × what was sent is very little
        await throttle(b, 1_000)
        for _ in range(5):
            await asyncio.sleep(0.1)
            await throttle(b, 1_000)
        return b.tokens.limit(now()), b.requests.limit(now())

    tokens, requests = run_virtual(main())
    assert tokens is not None and tokens >= MIN_REQUESTS_PER_MINUTE * 1_000 * 0.99
    assert requests is not None and requests >= MIN_REQUESTS_PER_MINUTE


def test_headers_of_a_success_never_teach_a_limit_below_what_was_admitted() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        async with b.admit(400) as permit:
            permit.observe({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-requests": "0"})
        return b

    b = run_virtual(main())
    assert b.tokens.learned == 400 * 6  # what this one request used of the window, per minute
    assert b.requests.learned is None  # a limit of 0 is not a limit


# ---- the window on requests in flight -------------------------------------------------------------


def test_the_window_bounds_requests_in_flight_and_slow_starts() -> None:
    async def main() -> tuple[int, int, float]:
        b = budget(tpm=None, rpm=None, max_window=64)
        peak = 0

        async def one() -> None:
            nonlocal peak
            async with b.admit(10):
                peak = max(peak, b.in_flight)
                await asyncio.sleep(1)

        await asyncio.gather(*(one() for _ in range(INITIAL_WINDOW)))
        first_peak = peak
        await asyncio.gather(*(one() for _ in range(200)))
        return first_peak, peak, b.window

    first_peak, peak, window = run_virtual(main())
    assert first_peak == INITIAL_WINDOW
    assert peak == 64  # grown by one per success while full, up to --concurrency
    assert window == 64


def test_concurrent_429s_cut_the_window_once() -> None:
    async def main() -> tuple[float, float]:
        b = budget(tpm=None, rpm=None)

        async def refused() -> None:
            await throttle(b)

        await asyncio.gather(*(refused() for _ in range(INITIAL_WINDOW)))
        after_burst = b.window
        await asyncio.sleep(1)
        await throttle(b)  # admitted after the cut: a new congestion signal
        return after_burst, b.window

    after_burst, after_next = run_virtual(main())
    assert after_burst == INITIAL_WINDOW / 2
    assert after_next == MIN_WINDOW  # half of the one request then in flight, floored


async def steady_load(b: RateBudget, latency: float, tasks: int, until: float) -> None:
    """`tasks` tasks sending back to back, each answer after `latency` s, until virtual time `until`."""

    async def one() -> None:
        while now() < until:
            async with b.admit(10) as permit:
                await asyncio.sleep(latency)
                permit.observe({})

    await asyncio.gather(*(one() for _ in range(tasks)))


def littles_law(b: RateBudget, rate_per_minute: float, latency: float) -> int:
    return int(LATENCY_HEADROOM * rate_per_minute / 60 * latency + WINDOW_SLACK)


def test_the_window_follows_the_paced_rate_times_latency_at_once() -> None:
    async def main() -> tuple[int, int, float | None]:
        b = budget(tpm=None, rpm=600, max_window=1024)  # 10 requests/s at 5 s: 50 in flight
        load = asyncio.create_task(steady_load(b, 5.0, 200, until=60))
        await asyncio.sleep(30)
        before = b.window_limit()
        await throttle(b, 10)  # the rate is cut: the window follows it, not half of what was in flight
        after = b.window_limit()
        cut = b.requests.limit(now())
        await load
        return before, after, cut

    before, after, cut = run_virtual(main())
    assert before == littles_law(budget(tpm=None, rpm=None), 600, 5.0)
    assert cut == pytest.approx(DECREASE_FACTOR * 600, rel=0.05)
    assert after == pytest.approx(LATENCY_HEADROOM * cut / 60 * 5.0 + WINDOW_SLACK, abs=1.5)


def test_with_long_latency_the_window_recovers_within_a_few_round_trips_of_a_429() -> None:
    async def main() -> tuple[int, int, int]:
        b = budget(tpm=None, rpm=600, max_window=1024)  # 10 requests/s at 12 s: 120 in flight
        load = asyncio.create_task(steady_load(b, 12.0, 400, until=200))
        await asyncio.sleep(60)
        full = b.window_limit()
        await throttle(b, 10)
        await asyncio.sleep(3 * 12)  # three round trips later
        recovered = b.window_limit()
        in_flight = b.in_flight
        await load
        return full, recovered, in_flight

    full, recovered, in_flight = run_virtual(main())
    # With one more request per round trip (AIMD on the window), 36 s would win back 3 of the ~120 lost.
    assert recovered >= 0.95 * full
    assert in_flight >= 0.9 * 120


def test_the_window_needs_no_more_than_rate_times_latency() -> None:
    async def main() -> tuple[int, int]:
        b = budget(tpm=None, rpm=600, max_window=64)  # 10 requests/s

        async def one() -> None:
            async with b.admit(10):
                await asyncio.sleep(0.5)

        await asyncio.gather(*(one() for _ in range(300)))
        return b.window_limit(), int(b.window)

    limit, window = run_virtual(main())
    assert limit == 11  # 2 × 10/s × 0.5 s + 1
    # It grew during the first second's burst (latency still unknown), then stopped: the rate, not the
    # window, held requests back.
    assert window < 32


def test_a_cancelled_wait_for_a_slot_leaks_nothing() -> None:
    async def main() -> int:
        b = budget(tpm=None, rpm=None, max_window=1)
        gate = asyncio.Event()

        async def holder() -> None:
            async with b.admit(1):
                await gate.wait()

        held = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(b.admit(1).__aenter__())
        await asyncio.sleep(0)
        waiting.cancel()
        gate.set()
        await held
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async with b.admit(1):
            return b.in_flight

    assert run_virtual(main()) == 1


def test_other_failures_release_the_slot_without_a_signal() -> None:
    async def main() -> RateBudget:
        b = budget(tpm=None, rpm=None)
        with pytest.raises(ValueError, match="boom"):
            async with b.admit(1):
                raise ValueError("boom")
        return b

    b = run_virtual(main())
    assert b.in_flight == 0
    assert b.window == INITIAL_WINDOW
    assert b.throttled == 0


def test_a_stuck_simulation_is_reported_not_hung() -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Deadlock):
        run_virtual(main())


class StillClock:
    def now(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("nothing should wait")


def test_budgets_are_per_deployment_and_report_what_they_know() -> None:
    budgets = Budgets(tpm=60_000, rpm=None, clock=StillClock(), concurrency=8)
    assert budgets["a"] is budgets["a"]
    assert budgets["a"] is not budgets["b"]
    assert budgets["a"].max_window == 8
    snapshot = budgets.snapshot()
    assert set(snapshot) == {"a", "b"}
    assert snapshot["a"]["tpm"]["configured"] == 60_000


# ---- simulations against the fake Azure OpenAI's limiter ------------------------------------------


@dataclass
class Simulation:
    tpm: int | None
    replicas: list[RateBudget]
    rpm: int | None = None
    prompts: int = 1200
    concurrency: int = 32
    send_headers: bool = True
    token_window_s: float = 10.0  # 60: tokens over a minute, as the public simulator counts them
    latency: float = 0.3  # seconds, plus latency_per_token × cost, plus up to `jitter`
    latency_per_token: float = 0.002
    jitter: float = 0.2
    ramp: int = 10  # seconds left out at the start of the busy window
    seed: int = 7
    split: list[float] | None = None  # each replica's part of the prompts (default: equal parts)
    peers_known: bool = False  # each replica is told how many others are still at work (worker/peers.py)
    finished_at: dict[int, float] = field(default_factory=dict)  # replica -> when its last answer came
    served: Counter[int] = field(default_factory=Counter)  # second -> tokens, as the fake counts them
    served_requests: Counter[int] = field(default_factory=Counter)
    served_by_replica: Counter[int] = field(default_factory=Counter)
    requests: int = 0
    throttled: int = 0

    async def run(self) -> None:
        limiter = SlidingWindowLimiter(token_window_s=self.token_window_s)
        rng = random.Random(self.seed)
        costs = [rng.randint(100, 300) for _ in range(self.prompts)]
        if self.split is None:
            queues = [costs[i :: len(self.replicas)] for i in range(len(self.replicas))]
        else:
            bounds = list(itertools.accumulate(int(part * len(costs)) for part in self.split))
            queues = [costs[start:end] for start, end in zip([0, *bounds[:-1]], bounds, strict=True)]
        at_work = set(range(len(self.replicas)))
        workers_left = Counter({index: self.concurrency // len(self.replicas) for index in at_work})
        if self.peers_known:
            for budget in self.replicas:
                budget.set_peers(len(at_work) - 1)

        def done(replica: int) -> None:
            workers_left[replica] -= 1
            if workers_left[replica] == 0:
                self.finished_at[replica] = now()
                at_work.discard(replica)
                if self.peers_known:
                    for index in at_work:
                        self.replicas[index].set_peers(len(at_work) - 1)

        async def worker(replica: int, budget: RateBudget, queue: list[int]) -> None:
            while queue:
                cost = queue.pop()
                while True:
                    self.requests += 1
                    try:
                        async with budget.admit(cost) as permit:
                            decision = limiter.acquire(cost, rpm=self.rpm, tpm=self.tpm, now=now())
                            response_headers = (
                                headers(decision.remaining_tokens, decision.remaining_requests)
                                if self.send_headers
                                else {}
                            )
                            if not decision.admitted:
                                # Azure, the public simulator and gateways alike say when to retry.
                                permit.throttled(
                                    {**response_headers, "retry-after-ms": str(decision.retry_after_ms)}
                                )
                                raise Throttled(decision.retry_after_ms)
                            await asyncio.sleep(
                                self.latency + self.latency_per_token * cost + rng.uniform(0, self.jitter)
                            )
                            permit.observe(response_headers)
                    except Throttled as exc:
                        self.throttled += 1
                        budget.pause(exc.retry_after_ms / 1000)
                        continue
                    self.served[int(now())] += cost
                    self.served_requests[int(now())] += 1
                    self.served_by_replica[replica] += cost
                    break
            done(replica)

        await asyncio.gather(
            *(
                worker(index, budget, queue)
                for index, budget in enumerate(self.replicas)
                for queue in [queues[index]] * (self.concurrency // len(self.replicas))
            )
        )

    def utilisation(self) -> float:
        """Served tokens (or requests, when only RPM is limited) per minute over the busy window (the
        first `ramp` seconds and the last 3 left out) ÷ the limit."""
        served, limit = (self.served, self.tpm) if self.tpm else (self.served_requests, self.rpm)
        assert limit
        first, last = min(served), max(served)
        busy = range(first + self.ramp, last - 2)
        return sum(served[s] for s in busy) / len(busy) * 60 / limit

    def throttled_ratio(self) -> float:
        return self.throttled / self.requests

    def utilisation_between(self, start: float, end: float) -> float:
        seconds = range(int(start) + 1, int(end))
        assert self.tpm and len(seconds) >= 5
        return sum(self.served[s] for s in seconds) / len(seconds) * 60 / self.tpm

    def shares(self) -> list[float]:
        total = sum(self.served_by_replica.values())
        return [self.served_by_replica[i] / total for i in range(len(self.replicas))]


def simulate(simulation: Simulation) -> Simulation:
    run_virtual(simulation.run())
    return simulation


@pytest.mark.parametrize("peers_known", [False, True])
def test_a_learned_limit_saturates_the_quota_without_429s(peers_known: bool) -> None:
    sim = simulate(
        Simulation(tpm=60_000, replicas=[budget(tpm=None, rpm=None, max_window=32)], peers_known=peers_known)
    )
    assert sim.utilisation() >= 0.95
    assert sim.throttled / sim.requests <= 0.02


def test_a_configured_limit_saturates_the_quota_without_any_429() -> None:
    sim = simulate(Simulation(tpm=60_000, replicas=[budget(tpm=60_000, rpm=None, max_window=32)]))
    assert sim.utilisation() >= 0.95
    assert sim.throttled == 0


def test_with_no_headers_aimd_finds_the_limit() -> None:
    sim = simulate(
        Simulation(tpm=60_000, replicas=[budget(tpm=None, rpm=None, max_window=32)], send_headers=False)
    )
    assert sim.utilisation() >= 0.85  # AIMD on the rate, back to near the last 429's rate at once
    assert sim.throttled / sim.requests <= 0.05


def test_with_no_headers_an_rpm_bound_quota_is_reached() -> None:
    b = budget(tpm=None, rpm=None, max_window=1024)
    sim = simulate(
        Simulation(tpm=None, rpm=600, replicas=[b], concurrency=200, prompts=1500, send_headers=False)
    )
    assert sim.utilisation() >= 0.85
    assert sim.throttled_ratio() <= 0.05


def test_headers_counting_a_minute_teach_the_true_limit_at_long_latency() -> None:
    # The public simulator: tokens over 60 s, remaining-tokens counting them; 12 s answers.
    b = budget(tpm=None, rpm=None, max_window=1024)
    sim = simulate(
        Simulation(
            tpm=60_000,
            replicas=[b],
            concurrency=400,
            prompts=1500,
            token_window_s=60,
            latency=11.0,
            latency_per_token=0.005,
            jitter=1.0,
            ramp=20,
        )
    )
    assert b.tokens.counts != 10  # never read as 10 s (the lower reading is the minute one)
    assert b.tokens.learned == pytest.approx(60_000, rel=0.05)  # not (remaining + 10 s usage) × 6
    assert sim.utilisation() >= 0.95
    assert sim.throttled_ratio() <= 0.02


@pytest.mark.parametrize("token_window_s", [10.0, 60.0])
def test_three_replicas_share_one_deployment_without_a_429_storm(token_window_s: float) -> None:
    replicas = [budget(tpm=None, rpm=None, max_window=1024) for _ in range(3)]
    sim = simulate(
        Simulation(
            tpm=60_000, replicas=replicas, concurrency=300, prompts=2400, token_window_s=token_window_s
        )
    )
    assert sim.utilisation() >= 0.8
    assert sim.throttled_ratio() <= 0.03
    assert min(sim.shares()) >= 0.3


def test_two_replicas_share_a_quota() -> None:
    replicas = [budget(tpm=None, rpm=None, max_window=16) for _ in range(2)]
    sim = simulate(Simulation(tpm=60_000, replicas=replicas, prompts=1600))
    # Each learns what the other leaves; the lag of Azure's 10 s window costs some 429s and some quota.
    assert sim.utilisation() >= 0.75
    assert sim.throttled / sim.requests <= 0.05
    shares = [sim.served_by_replica[i] / sum(sim.served_by_replica.values()) for i in range(2)]
    assert min(shares) >= 0.35


def test_replicas_told_how_many_others_are_at_work_share_a_deployment_as_well() -> None:
    replicas = [budget(tpm=None, rpm=None, max_window=1024) for _ in range(3)]
    sim = simulate(Simulation(tpm=60_000, replicas=replicas, concurrency=300, prompts=2400, peers_known=True))
    assert sim.utilisation() >= 0.9
    assert sim.throttled_ratio() <= 0.03
    assert min(sim.shares()) >= 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_replica_left_alone_takes_up_the_quota_the_others_leave_sooner_when_told(seed: int) -> None:
    # Three replicas, one with half the work: the last one at work finishes alone. Told that it is alone
    # (worker/peers.py), it claims all that remains at once; not told, half of what remains while the
    # others' usage still shows, and a higher reading only over LEARN_SECONDS.
    def left_alone(peers_known: bool) -> tuple[float, Simulation]:
        replicas = [budget(tpm=None, rpm=None, max_window=1024) for _ in range(3)]
        sim = simulate(
            Simulation(
                tpm=60_000,
                replicas=replicas,
                prompts=2400,
                concurrency=96,
                split=[0.25, 0.25, 0.5],
                peers_known=peers_known,
                seed=seed,
            )
        )
        alone_from = sorted(sim.finished_at.values())[1]
        return sim.utilisation_between(alone_from, alone_from + 15), sim

    told, sim = left_alone(True)
    not_told, _ = left_alone(False)
    assert told >= not_told + 0.1  # e.g. 0.81 against 0.68 in the 15 s after the others stopped
    assert sim.utilisation() >= 0.93
    assert sim.throttled_ratio() <= 0.02
