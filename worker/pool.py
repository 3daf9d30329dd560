"""Many deployments, one job: the `[[deployments]]` of a job file and the routing of each attempt.

**Configuration.** A job file lists deployments (`[[deployments]]`: name, endpoint, serves, priority, tpm,
rpm); `AZURE_OPENAI_DEPLOYMENTS=a,b,c` is the shorthand for a pool on the one endpoint, priority in that
order, serving `--deployment` (else the first name). `parse_deployments` and `deployments_from_env`
validate them strictly: unknown keys, duplicate deployments and endpoints that are not Azure OpenAI
endpoints are configuration errors that name the fix.

**Targeting.** A request targets `body.model`, else `--deployment`. A name that some deployment `serves`
(an alias) reaches every deployment serving it; else a deployment's own name reaches just that one (or
each deployment of that name, when the same name is configured at several endpoints); any other name is
called as a deployment at AZURE_OPENAI_ENDPOINT, as without a pool.

**Routing** (`Router.choose`, per attempt): of the deployments a request reaches that are not out for
the run, the highest-priority one with budget available *now* (no 429 pause, pacing allows it, a slot in
its in-flight window, circuit closed or due for a probe) takes the attempt; equal priorities go to the one
with the most budget left in its window. When none has budget now, the attempt waits for the one that
frees first (in its own queue: no polling). A 429 pauses that deployment's budget, so the next attempt
goes elsewhere at once. A deployment is out for the run when its circuit goes down (an outage past
--outage-seconds, a quota used up for the day); only when every deployment a name reaches is out does
its request fail with DeploymentDown.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import openai

from worker.errors import ConfigError, DeploymentDown
from worker.health import Circuit, Health
from worker.ratelimit import Budgets, RateBudget

DEPLOYMENT_KEYS = ("name", "endpoint", "serves", "priority", "tpm", "rpm")
AZURE_OPENAI_HOST_SUFFIXES = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
    ".openai.azure.us",
    ".cognitiveservices.azure.us",
    ".openai.azure.cn",
    ".cognitiveservices.azure.cn",
)
"""Hosts of Azure OpenAI (Azure AI Services / AI Foundry) resources, public and sovereign clouds."""
LOOPBACK_HOSTS = ("localhost",)


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """One `[[deployments]]` entry, validated."""

    name: str
    endpoint: str | None = None
    """None: AZURE_OPENAI_ENDPOINT."""
    serves: str = ""
    """The alias it serves; its own name when not set."""
    priority: int = 0
    tpm: int | None = None
    rpm: int | None = None

    def __post_init__(self) -> None:
        if not self.serves:
            object.__setattr__(self, "serves", self.name)


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` is not an Azure OpenAI endpoint (https://RESOURCE.openai.azure.com), or None.

    Accepted: https, no path, query or credentials, and a host of an Azure OpenAI or Azure AI Services
    resource (public or sovereign cloud), or a loopback address (a local stand-in or a tunnel).
    """
    try:
        parts = urlsplit(endpoint)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if parts.scheme != "https":
        return "must start with https://"
    if parts.username or parts.password:
        return "must not hold credentials"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must have no path (the SDK adds /openai/deployments/...)"
    if host.endswith(AZURE_OPENAI_HOST_SUFFIXES) or host in LOOPBACK_HOSTS or _is_loopback(host):
        return None
    if host in ("api.openai.com",) or host.endswith(".openai.com"):
        return "is OpenAI's own API, not Azure OpenAI"
    return f"has host {host!r}, not an Azure OpenAI resource (RESOURCE{AZURE_OPENAI_HOST_SUFFIXES[0]})"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _entry(raw: object, where: str) -> DeploymentConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a table (name = ..., priority = ...)")
    if isinstance(raw.get("name"), str):
        where = f"{where} ({raw['name']!r})"
    unknown = sorted(set(raw) - set(DEPLOYMENT_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'`{k}`' for k in unknown)} "
            f"(known: {', '.join(DEPLOYMENT_KEYS)})"
        )
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name:
        raise ConfigError(
            f"{where}: `name` must be the deployment's name at its endpoint (a non-empty string)"
        )
    endpoint = raw.get("endpoint")
    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise ConfigError(
                f"{where}: `endpoint` must be a string such as https://RESOURCE.openai.azure.com"
            )
        problem = endpoint_problem(endpoint)
        if problem is not None:
            raise ConfigError(
                f"{where}: endpoint {endpoint!r} {problem}: set it to the resource's endpoint, "
                "https://RESOURCE.openai.azure.com (Azure portal: the resource's Keys and Endpoint)"
            )
        endpoint = endpoint.rstrip("/")
    serves = raw.get("serves", name)
    if not isinstance(serves, str) or not serves.strip():
        raise ConfigError(f"{where}: `serves` must be the alias requests name (a non-empty string)")
    numbers: dict[str, int | None] = {}
    for key, low in (("priority", 0), ("tpm", 1), ("rpm", 1)):
        value = raw.get(key)
        if value is None and key != "priority":
            numbers[key] = None
            continue
        value = 0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{where}: `{key}` must be a whole number >= {low}, not {value!r}")
        numbers[key] = value
    return DeploymentConfig(
        name=name,
        endpoint=endpoint,
        serves=serves,
        priority=numbers["priority"] or 0,
        tpm=numbers["tpm"],
        rpm=numbers["rpm"],
    )


def parse_deployments(raw: object, where: str) -> tuple[DeploymentConfig, ...]:
    """The `[[deployments]]` array of a job file, validated; ConfigError naming the entry and the fix."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: `deployments` must be an array of tables ([[deployments]] entries)")
    entries = tuple(
        _entry(item, f"{where}: [[deployments]] entry {index}") for index, item in enumerate(raw, 1)
    )
    _check_unique(entries, where)
    return entries


def deployments_from_env(value: str, alias: str | None) -> tuple[DeploymentConfig, ...]:
    """AZURE_OPENAI_DEPLOYMENTS=a,b,c: a pool on AZURE_OPENAI_ENDPOINT, priority in that order, serving
    `alias` (--deployment) or, when that is not set, the first name."""
    names = [name.strip() for name in value.split(",")]
    if not names or any(not name or "/" in name for name in names):
        raise ConfigError(
            f"AZURE_OPENAI_DEPLOYMENTS={value!r}: must be deployment names separated by commas, e.g. "
            "gpt-4o-mini-ptu,gpt-4o-mini"
        )
    serves = alias or names[0]
    entries = tuple(
        DeploymentConfig(name=name, serves=serves, priority=index) for index, name in enumerate(names)
    )
    _check_unique(entries, "AZURE_OPENAI_DEPLOYMENTS")
    return entries


def _check_unique(entries: Sequence[DeploymentConfig], where: str) -> None:
    seen: set[tuple[str, str | None]] = set()
    for entry in entries:
        key = (entry.name, entry.endpoint)
        if key in seen:
            at = entry.endpoint or "AZURE_OPENAI_ENDPOINT"
            raise ConfigError(
                f"{where}: deployment {entry.name!r} at {at} is listed twice: list each deployment once"
            )
        seen.add(key)


def labels(entries: Sequence[DeploymentConfig]) -> list[str]:
    """A unique label per entry for budgets, circuits and reports: its name, or `name@host` when the same
    name is configured at several endpoints."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.name] = counts.get(entry.name, 0) + 1
    return [
        entry.name
        if counts[entry.name] == 1
        else f"{entry.name}@{urlsplit(entry.endpoint).hostname if entry.endpoint else 'default'}"
        for entry in entries
    ]


# ---- the run's deployments --------------------------------------------------------------------------


@dataclass
class DeploymentCounts:
    """What one deployment did in this run."""

    calls: int = 0
    succeeded: int = 0
    throttled: int = 0
    failed: int = 0
    """Attempts that failed otherwise (5xx, timeouts, connection errors)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Deployment:
    """One deployment as the run uses it: where it is, its client, budget, circuit and counts."""

    label: str
    name: str
    endpoint: str | None
    serves: str
    priority: int
    order: int
    client: openai.AsyncAzureOpenAI
    budget: RateBudget
    circuit: Circuit
    configured: bool
    counts: DeploymentCounts = field(default_factory=DeploymentCounts)

    def wait_estimate(self, cost: int) -> float:
        """Seconds until an attempt of `cost` could go out here (0: now); inf once it is down."""
        return max(self.circuit.wait_estimate(), self.budget.wait_estimate(cost))

    def report(self) -> dict[str, Any]:
        """Counts, where it is and what the budget learned, for the summary and the manifest."""
        limits = self.budget.snapshot()
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "serves": self.serves,
            "priority": self.priority,
            **vars(self.counts),
            "tpm": _known(limits["tpm"]),
            "rpm": _known(limits["rpm"]),
            "down": None if self.circuit.down is None else str(self.circuit.down),
        }


def _known(limit: dict[str, Any]) -> int | None:
    """The per-minute limit configured, else learned (None: neither)."""
    value = limit["configured"] if limit["configured"] is not None else limit["learned"]
    return None if value is None else round(value)


@dataclass(frozen=True)
class Route:
    """The deployments one target name reaches, in priority order."""

    target: str
    deployments: tuple[Deployment, ...]


class Router:
    """Resolves target names to deployments and picks the deployment of each attempt."""

    def __init__(
        self,
        entries: Sequence[DeploymentConfig],
        *,
        client_for: Callable[[str | None], openai.AsyncAzureOpenAI],
        budgets: Budgets,
        health: Health,
    ) -> None:
        self._client_for = client_for
        self._budgets = budgets
        self._health = health
        self._deployments: dict[str, Deployment] = {}
        for order, (label, entry) in enumerate(zip(labels(entries), entries, strict=True)):
            self._deployments[label] = Deployment(
                label=label,
                name=entry.name,
                endpoint=entry.endpoint,
                serves=entry.serves,
                priority=entry.priority,
                order=order,
                client=client_for(entry.endpoint),
                budget=budgets.configure(label, tpm=entry.tpm, rpm=entry.rpm),
                circuit=health[label],
                configured=True,
            )
        self._routes: dict[str, Route] = {}

    @property
    def pooled(self) -> bool:
        """True when the job configures deployments."""
        return any(d.configured for d in self._deployments.values())

    @property
    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    @property
    def any_verified(self) -> bool:
        return any(d.circuit.verified for d in self._deployments.values())

    def window(self) -> int:
        """Requests the deployments' budgets let in flight now, over all of them."""
        return self._budgets.window()

    def windows_full(self) -> bool:
        """Every request the deployments' budgets let in flight is taken (see `Budgets.full`)."""
        return self._budgets.full()

    def route(self, target: str) -> Route:
        """What `target` reaches: the deployments serving it, else those of that name, else the
        deployment of that name at AZURE_OPENAI_ENDPOINT (as without a pool)."""
        route = self._routes.get(target)
        if route is None:
            configured = [d for d in self._deployments.values() if d.configured]
            reached = [d for d in configured if d.serves == target] or [
                d for d in configured if d.name == target
            ]
            if reached:
                reached.sort(key=lambda d: (d.priority, d.order))
                route = Route(target, tuple(reached))
            else:
                route = Route(target, (self._unconfigured(target),))
            self._routes[target] = route
        return route

    def _unconfigured(self, name: str) -> Deployment:
        label = name if name not in self._deployments else f"{name}@default"
        deployment = self._deployments.get(label)
        if deployment is None:
            deployment = self._deployments[label] = Deployment(
                label=label,
                name=name,
                endpoint=None,
                serves=name,
                priority=0,
                order=len(self._deployments),
                client=self._client_for(None),
                budget=self._budgets[label],
                circuit=self._health[label],
                configured=False,
            )
        return deployment

    async def choose(self, route: Route, cost: int) -> tuple[Deployment, bool]:
        """The deployment of the next attempt and whether it is its circuit's probe (see the module
        docstring). Raises DeploymentDown when every deployment of the route is out for the run."""
        while True:
            alive = [d for d in route.deployments if d.circuit.down is None]
            if not alive:
                raise _all_down(route)
            if len(route.deployments) == 1:  # nothing to choose: wait for its circuit, then its budget
                return alive[0], await alive[0].circuit.admit()
            waits = {d: d.wait_estimate(cost) for d in alive}
            ready = [d for d in alive if waits[d] <= 0.0]
            if ready:
                first = min(d.priority for d in ready)
                chosen = max(
                    (d for d in ready if d.priority == first),
                    key=lambda d: (
                        d.budget.headroom(),
                        d.budget.window_limit() - d.budget.in_flight,
                        -d.order,
                    ),
                )
            else:  # none has budget now: queue at the one that frees first
                chosen = min(alive, key=lambda d: (waits[d], d.priority, d.order))
            try:
                probe = await chosen.circuit.admit()
            except DeploymentDown:
                continue  # it went down while this attempt waited: route again
            return chosen, probe

    def report(self) -> dict[str, dict[str, Any]]:
        """Per deployment (label): counts, where it is, learned limits; the ones this run used."""
        return {
            label: deployment.report()
            for label, deployment in self._deployments.items()
            if deployment.configured or deployment.counts.calls
        }


def _all_down(route: Route) -> DeploymentDown:
    downs = [d.circuit.down for d in route.deployments if d.circuit.down is not None]
    if len(route.deployments) == 1 and downs:
        return downs[0]
    reasons = "; ".join(str(down) for down in downs)
    return DeploymentDown(route.target, f"has no deployment left that is up ({reasons})")


def endpoints(entries: Iterable[DeploymentConfig]) -> list[str | None]:
    """The distinct endpoints of a pool (None: AZURE_OPENAI_ENDPOINT), in order."""
    seen: list[str | None] = []
    for entry in entries:
        if entry.endpoint not in seen:
            seen.append(entry.endpoint)
    return seen
