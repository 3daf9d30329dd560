"""The router on virtual time: priority, spill-over on no budget or a 429, sharing, waiting, dropping out.

Each simulated deployment is the fake Azure OpenAI's own sliding-window limiter (tests/stack/ratelimit.py)
behind the worker's real budget, circuit and router; the loop mirrors `Caller.call` (choose, admit,
answer or 429 → pause). No client is called, so none is made.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.stack.ratelimit import SlidingWindowLimiter
from worker.errors import DeploymentDown
from worker.health import PROBE_FIRST_SECONDS, Health
from worker.pool import DeploymentConfig, Router
from worker.ratelimit import Budgets, RateBudget

from .virtual_time import LoopClock, run_virtual

ALIAS = "pool"


def router(*entries: DeploymentConfig, tpm: int | None = None) -> Router:
    budgets = Budgets(tpm=tpm, rpm=None, clock=LoopClock(), concurrency=32)
    health = Health(outage_seconds=60)
    return Router(entries, client_for=lambda _endpoint: None, budgets=budgets, health=health)  # type: ignore[arg-type, return-value]


def entry(name: str, priority: int = 0, **limits: int) -> DeploymentConfig:
    return DeploymentConfig(name=name, serves=ALIAS, priority=priority, **limits)  # type: ignore[arg-type]


def now() -> float:
    return asyncio.get_running_loop().time()


async def simulate(
    pool: Router, quotas: dict[str, dict[str, int]], requests: int, *, cost: int = 100, latency: float = 0.2
) -> dict[str, Any]:
    """`requests` items through `pool`, 16 at a time, each deployment limited by its `quotas` entry."""
    limiters = {name: SlidingWindowLimiter() for name in quotas}
    served: Counter[str] = Counter()
    throttled: Counter[str] = Counter()
    chosen: list[str] = []
    route = pool.route(ALIAS)
    work = iter(range(requests))

    async def worker() -> None:
        for _ in work:
            while True:
                deployment, probe = await pool.choose(route, cost)
                chosen.append(deployment.name)
                async with deployment.budget.admit(cost) as permit:
                    decision = limiters[deployment.name].acquire(cost, now=now(), **quotas[deployment.name])
                    headers = {
                        "x-ratelimit-remaining-tokens": str(decision.remaining_tokens),
                        "x-ratelimit-remaining-requests": str(decision.remaining_requests),
                    }
                    if not decision.admitted:
                        permit.throttled(headers)
                        throttled[deployment.name] += 1
                        deployment.circuit.answered(probe, ok=False)
                        deployment.budget.pause(decision.retry_after_ms / 1000)
                        continue
                    await asyncio.sleep(latency)
                    permit.observe(headers)
                deployment.circuit.answered(probe, ok=True)
                served[deployment.name] += 1
                break

    await asyncio.gather(*(worker() for _ in range(16)))
    return {"served": served, "throttled": throttled, "chosen": chosen, "elapsed": now()}


def test_priority_0_takes_everything_it_has_budget_for_and_the_rest_spills() -> None:
    pool = router(entry("ptu", 0, rpm=60), entry("paygo", 1, rpm=600))
    quotas = {"ptu": {"rpm": 60, "tpm": None}, "paygo": {"rpm": 600, "tpm": None}}  # type: ignore[dict-item]

    result = run_virtual(simulate(pool, quotas, 600))

    served, elapsed = result["served"], result["elapsed"]
    assert sum(served.values()) == 600
    assert sum(result["throttled"].values()) == 0
    assert result["chosen"][0] == "ptu"
    # ptu ran at its quota all along (1 a second, plus the first second's burst); paygo took the rest
    assert 0.95 * elapsed <= served["ptu"] <= elapsed + 3
    assert served["paygo"] == 600 - served["ptu"]


def test_priority_0_alone_when_its_budget_suffices() -> None:
    pool = router(entry("ptu", 0, rpm=6000), entry("paygo", 1, rpm=6000))
    quotas = {"ptu": {"rpm": 6000, "tpm": None}, "paygo": {"rpm": 6000, "tpm": None}}  # type: ignore[dict-item]

    result = run_virtual(simulate(pool, quotas, 200, latency=1.0))

    assert result["served"] == {"ptu": 200}


def test_equal_priorities_share_by_the_budget_each_has() -> None:
    pool = router(entry("big", tpm=60_000), entry("small", tpm=30_000))
    quotas = {"big": {"tpm": 60_000, "rpm": None}, "small": {"tpm": 30_000, "rpm": None}}  # type: ignore[dict-item]

    result = run_virtual(simulate(pool, quotas, 3000))

    served = result["served"]
    assert sum(result["throttled"].values()) == 0
    assert 1.7 <= served["big"] / served["small"] <= 2.3, served
    pooled_per_minute = 3000 * 100 / result["elapsed"] * 60
    assert pooled_per_minute >= 0.9 * 90_000


def test_learned_limits_a_429_spills_at_once_and_both_end_up_used() -> None:
    pool = router(entry("a", 0), entry("b", 1))
    quotas = {"a": {"rpm": 120, "tpm": None}, "b": {"rpm": 120, "tpm": None}}  # type: ignore[dict-item]

    result = run_virtual(simulate(pool, quotas, 400))

    served, throttled = result["served"], result["throttled"]
    assert served["a"] > 0 and served["b"] > 0
    assert sum(throttled.values()) <= 0.05 * 400
    assert 400 * 60 / result["elapsed"] >= 0.85 * 240


def test_a_429_sends_the_next_attempt_elsewhere_at_once_and_none_free_waits_for_the_first() -> None:
    async def scenario() -> None:
        pool = router(entry("a", 0), entry("b", 1))
        route = pool.route(ALIAS)
        a, b = route.deployments
        assert (await pool.choose(route, 10))[0] is a
        a.budget.pause(30)  # a 429 asking for 30 s
        assert (await pool.choose(route, 10))[0] is b
        b.budget.pause(5)
        started = now()
        chosen, _probe = await pool.choose(route, 10)
        assert chosen is b and now() == started  # queues at the one that frees first, without spinning
        async with chosen.budget.admit(10) as permit:
            assert permit.waited == pytest.approx(5)

    run_virtual(scenario())


def test_a_deployment_down_drops_out_and_the_route_fails_only_when_all_are_down() -> None:
    async def scenario() -> None:
        pool = router(entry("a", 0), entry("b", 1))
        route = pool.route(ALIAS)
        a, b = route.deployments
        a.circuit.give_up("quota used up")
        assert (await pool.choose(route, 10))[0] is b
        b.circuit.give_up("outage")
        with pytest.raises(DeploymentDown) as down:
            await pool.choose(route, 10)
        assert down.value.deployment == ALIAS
        assert "quota used up" in str(down.value) and "outage" in str(down.value)

    run_virtual(scenario())


def test_an_open_circuit_is_passed_over_until_its_probe_is_due() -> None:
    async def scenario() -> None:
        pool = router(entry("a", 0), entry("b", 1))
        route = pool.route(ALIAS)
        a, b = route.deployments
        for _ in range(5):
            a.circuit.failed(False, "http_503")
        assert a.circuit.is_open
        assert (await pool.choose(route, 10)) == (b, False)
        await asyncio.sleep(PROBE_FIRST_SECONDS)  # virtual time: the first probe falls due
        assert (await pool.choose(route, 10)) == (a, True)
        assert (await pool.choose(route, 10)) == (b, False)  # one probe at a time

    run_virtual(scenario())


def test_targeting() -> None:
    pool = router(
        DeploymentConfig(name="ptu", serves="chat", priority=0),
        DeploymentConfig(name="paygo", serves="chat", priority=1),
        DeploymentConfig(name="embed"),
        DeploymentConfig(name="chat-old", serves="paygo"),
    )
    assert [d.name for d in pool.route("chat").deployments] == ["ptu", "paygo"]
    assert [d.name for d in pool.route("ptu").deployments] == ["ptu"]
    assert [d.name for d in pool.route("embed").deployments] == ["embed"]
    # an alias wins over a deployment's own name
    assert [d.name for d in pool.route("paygo").deployments] == ["chat-old"]
    other = pool.route("gpt-4.1").deployments
    assert [(d.name, d.endpoint, d.configured) for d in other] == [("gpt-4.1", None, False)]
    assert pool.route("gpt-4.1").deployments[0] is other[0]


def test_the_same_name_at_two_endpoints_is_two_deployments() -> None:
    pool = router(
        DeploymentConfig(name="gpt-4o-mini", endpoint="https://swc.openai.azure.com", serves=ALIAS),
        DeploymentConfig(
            name="gpt-4o-mini", endpoint="https://eus.openai.azure.com", serves=ALIAS, priority=1
        ),
    )
    labels = [d.label for d in pool.route("gpt-4o-mini").deployments]
    assert labels == ["gpt-4o-mini@swc.openai.azure.com", "gpt-4o-mini@eus.openai.azure.com"]

    async def report() -> set[str]:
        return set(pool.report())

    assert run_virtual(report()) == set(labels)


def test_the_budget_wait_estimate_takes_no_place_and_matches_the_wait() -> None:
    async def scenario() -> None:
        budget = RateBudget(tpm=None, rpm=60, clock=LoopClock(), max_window=4)
        assert budget.wait_estimate(10) == 0.0
        for _ in range(3):  # the burst, then pacing at one a second
            async with budget.admit(10):
                pass
        estimate = budget.wait_estimate(10)
        assert estimate > 0
        assert budget.wait_estimate(10) == estimate  # asking again changes nothing
        async with budget.admit(10) as permit:
            assert permit.waited == pytest.approx(estimate)
        budget.pause(30)
        assert budget.wait_estimate(10) == pytest.approx(30)

    run_virtual(scenario())


def test_a_full_window_counts_as_no_budget_now() -> None:
    async def scenario() -> None:
        budget = RateBudget(tpm=None, rpm=None, clock=LoopClock(), max_window=2)
        release = asyncio.Event()

        async def hold() -> None:
            async with budget.admit(10):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(2)]
        await asyncio.sleep(0)
        assert budget.in_flight == 2
        assert budget.wait_estimate(10) > 0
        release.set()
        await asyncio.gather(*holders)
        assert budget.wait_estimate(10) == 0.0

    run_virtual(scenario())
