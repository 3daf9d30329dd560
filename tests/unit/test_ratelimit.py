import asyncio

from worker.ratelimit import RateBudget, TokenBucket, estimate_tokens


class FakeClock:
    """Time moves only when someone sleeps; sleepers yield, so concurrent waits overlap as they would."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        wake = self.t + seconds
        await asyncio.sleep(0)
        self.t = max(self.t, wake)


def test_estimate_is_chars_over_four_plus_max_tokens() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
    assert estimate_tokens(body) == 200
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]}
    assert estimate_tokens(parts) == 10 + 16
    assert estimate_tokens({"input": "z" * 8}) == 2 + 16


def test_bucket_admits_a_sixth_of_a_minute_then_paces() -> None:
    bucket = TokenBucket(600)  # 10 per second, burst 100
    assert all(bucket.reserve(1, 0.0) == 0 for _ in range(100))
    assert bucket.reserve(1, 0.0) == 0.1
    assert bucket.reserve(1, 10.0) == 0  # refilled after 10 s


async def test_budget_spreads_requests_to_the_rpm() -> None:
    clock = FakeClock()
    budget = RateBudget(tpm=None, rpm=60, clock=clock)  # 1 request/s, burst 10
    for _ in range(30):
        await budget.acquire(1)
    # 10 immediately, the next 20 at one per second
    assert 19 <= clock.t - 1000.0 <= 21


async def test_a_429_pause_holds_every_request() -> None:
    clock = FakeClock()
    budget = RateBudget(tpm=None, rpm=None, clock=clock)
    budget.pause(2.5)
    waited = await asyncio.gather(budget.acquire(10), budget.acquire(10))
    assert waited == [2.5, 2.5]
    assert await budget.acquire(10) == 0


async def test_tpm_budget_counts_tokens() -> None:
    clock = FakeClock()
    budget = RateBudget(tpm=6000, rpm=None, clock=clock)  # 100 tokens/s, burst 1000
    for _ in range(10):
        await budget.acquire(100)
    assert clock.t == 1000.0
    await budget.acquire(500)
    assert clock.t == 1005.0
