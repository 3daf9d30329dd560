"""One request → one Azure OpenAI call, retried at this one layer (the SDK's own retries are off).

Every failed attempt is classified once (`classify`), and the wait before the next one is a pure
function of the failure and the attempt number (`retry_delay`):

- RETRY (5xx, 408, 409, timeouts, connection errors, token-endpoint outages): never a record. A
  deployment that keeps failing opens its circuit (worker.health): then items wait for it without
  spending attempts, up to `--outage-seconds`. A failure while the circuit stays closed (the
  deployment is otherwise answering) spends one of the item's `--max-attempts`. Spent attempts or an
  outage leave the item `Unfinished` (exit 1).
- THROTTLED (429): the deployment's budget pauses for the server's retry-after and cuts its pace;
  not an attempt. A retry-after longer than `MAX_SERVER_WAIT_SECONDS` (a daily or monthly quota)
  takes the deployment out of this run. With a pool the next attempt goes at once to another
  deployment that has budget now (worker.pool routes every attempt).
- REAUTH (401 with an Entra token): the shared cache gets a newly issued token and the call goes again;
  a newly issued token rejected again is a configuration error (exit 2).
- FINAL (content_filter, invalid request, context too long, ...): recorded at once as an error line.
- MISCONFIGURED (404, 400 OperationNotSupported): a retired api-version, a wrong endpoint path or
  deployment, chat sent to an embeddings deployment. Before the deployment has ever answered with a
  success this is a configuration error (exit 2, nothing recorded); a deployment named only by some
  lines' `body.model` that does not exist gets error records for those lines.
- FATAL (403, the key is wrong): no item can succeed; exit 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import structlog
from azure.core.exceptions import ServiceRequestError, ServiceResponseError

from worker.errors import AccessDenied, ConfigError, Unfinished
from worker.formats import Request
from worker.health import Circuit
from worker.identity import OPENAI_SCOPE, SharedTokens, describe_principal
from worker.pool import Deployment, Router
from worker.ratelimit import Permit, estimate_tokens
from worker.report import RunStats

log = structlog.get_logger("worker.calls")

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
MAX_SERVER_WAIT_SECONDS = 300.0
MAX_REAUTHS_PER_ITEM = 2
TRANSIENT_ERRORS = (
    openai.APITimeoutError,
    openai.APIConnectionError,
    ServiceRequestError,
    ServiceResponseError,
)


class Verdict(enum.Enum):
    RETRY = "retry"
    THROTTLED = "throttled"
    REAUTH = "reauth"
    FINAL = "final"
    MISCONFIGURED = "misconfigured"
    FATAL = "fatal"


def classify(exc: BaseException) -> Verdict:
    """What a failed attempt means (see the module docstring)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return Verdict.RETRY
    if not isinstance(exc, openai.APIStatusError):
        return Verdict.FATAL
    status = exc.status_code
    if status == 429:
        return Verdict.THROTTLED
    if status == 401:
        return Verdict.REAUTH
    if status == 403:
        return Verdict.FATAL
    if status == 404 or (status == 400 and error_code(exc) == "OperationNotSupported"):
        return Verdict.MISCONFIGURED
    if status in (408, 409) or status >= 500:
        return Verdict.RETRY
    return Verdict.FINAL


def server_wait_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait a response asks for: `retry-after-ms` first, then `retry-after` (seconds or HTTP date).

    None when neither holds a usable wait: a value that is no number (nor, for `retry-after`, an HTTP
    date), NaN or infinite is ignored, never raised.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name != "retry-after":
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        if seconds < float("inf"):  # False for NaN and infinity
            return max(0.0, seconds)
    return None


def backoff_seconds(attempt: int, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter for the wait after attempt number `attempt` (1-based)."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (min(attempt, 32) - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def retry_delay(exc: BaseException, attempt: int) -> float:
    """Seconds to wait before the next attempt after `exc` on attempt `attempt`: what the server asked
    (when it asked for no more than MAX_SERVER_WAIT_SECONDS), else jittered exponential backoff."""
    if isinstance(exc, openai.APIStatusError):
        hint = server_wait_seconds(exc.response.headers)
        if hint is not None and hint <= MAX_SERVER_WAIT_SECONDS:
            return hint
    return backoff_seconds(attempt)


def _error_field(exc: openai.APIStatusError, name: str) -> str | None:
    """`error.<name>` of the service's answer (Azure nests it under `error`, a 401 does not)."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get(name):
            return str(inner[name])
    return None


def error_code(exc: openai.APIStatusError) -> str:
    """The service's error code (`error.code`), else `http_<status>`."""
    return _error_field(exc, "code") or f"http_{exc.status_code}"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return _error_field(exc, "message") or f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "the request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"could not connect to Azure OpenAI ({type(exc.__cause__).__name__ if exc.__cause__ else 'connection error'})"
    return str(exc)


def describe_failure(exc: BaseException) -> str:
    """A short name for a failure, for logs: `http_503`, `APITimeoutError`, ..."""
    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}"
    return type(exc).__name__


def _request_id(headers: Mapping[str, str]) -> str | None:
    return headers.get("apim-request-id") or headers.get("x-request-id")


def _service_response(exc: openai.APIStatusError) -> dict[str, Any]:
    body: Any = exc.body
    with contextlib.suppress(ValueError, httpx2.ResponseNotRead):
        body = exc.response.json()
    return {"status_code": exc.status_code, "request_id": _request_id(exc.response.headers), "body": body}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final state of one item: exactly one of response-with-no-error or error is the verdict."""

    response: dict[str, Any] | None
    error: dict[str, str] | None


class InvalidResponse(Exception):
    """The call completed but its answer could not be read (not JSON, not an object, ...)."""

    def __init__(self, response: httpx2.Response, detail: str) -> None:
        super().__init__(detail)
        self.outcome = Outcome(
            {"status_code": response.status_code, "request_id": _request_id(response.headers), "body": None},
            {
                "code": "invalid_response",
                "message": f"the answer (HTTP {response.status_code}, content-type "
                f"{response.headers.get('content-type', '?')}) could not be read: {detail}"[:1000],
            },
        )


class Caller:
    """Makes the calls of a run through the router's deployments (their clients, budgets and circuits)
    and one token cache."""

    def __init__(
        self,
        router: Router,
        *,
        tokens: SharedTokens | None,
        stats: RunStats,
        default_deployment: str | None,
        max_attempts: int,
        request_timeout: float,
    ) -> None:
        self._router = router
        self._tokens = tokens
        self._stats = stats
        self._default_deployment = default_deployment
        self._max_attempts = max_attempts
        self._timeout = request_timeout

    @property
    def default_deployment(self) -> str | None:
        return self._default_deployment

    def deployment_for(self, request: Request) -> tuple[str, bool]:
        """The deployment (or alias) to call and whether the input itself named it (`body.model`)."""
        model = request.body.get("model")
        if isinstance(model, str) and model:
            return model, model != self._default_deployment
        if not self._default_deployment:
            raise ConfigError(
                "missing setting: --deployment or AZURE_OPENAI_DEPLOYMENT (the Azure OpenAI deployment "
                f"to call; {request.custom_id} names no `model`)"
            )
        return self._default_deployment, False

    async def call(self, request: Request) -> Outcome:
        """Call until success or a final answer. Raises ConfigError (exit 2) for a configuration problem,
        Unfinished (no record; the next run retries) when retryable failures are left.

        Each attempt goes to the deployment the router picks (worker.pool): with a pool, a 429 or a
        deployment out for the run sends the next attempt to another deployment at once."""
        target, named_by_input = self.deployment_for(request)
        route = self._router.route(target)
        cost = estimate_tokens(request.body)
        spent = reauths = throttles = 0
        while True:
            deployment, probe = await self._router.choose(route, cost)
            body = {**request.body, "model": deployment.name}
            outcome, failure = await self._attempt_once(request, body, cost, deployment, probe)
            if failure is None:
                assert outcome is not None
                return outcome
            verdict = classify(failure)
            if verdict is Verdict.RETRY:
                deployment.counts.failed += 1
                spent = await self._after_transient(failure, deployment.circuit, probe, spent)
                continue
            assert isinstance(failure, openai.APIStatusError)
            deployment.circuit.answered(probe, ok=False)
            if verdict is Verdict.THROTTLED:
                throttles += 1
                deployment.counts.throttled += 1
                self._stats.throttled += 1
                self._stats.retries += 1
                self._throttled(failure, deployment, throttles)
                continue
            if verdict is Verdict.REAUTH:
                reauths += 1
                await self._after_401(failure, reauths)
                continue
            return self._final(failure, verdict, deployment, named_by_input)

    async def _attempt_once(
        self,
        request: Request,
        body: dict[str, Any],
        cost: int,
        deployment: Deployment,
        probe: bool,
    ) -> tuple[Outcome | None, BaseException | None]:
        """One attempt under the deployment's budget: (the outcome, None) for an answer worth recording,
        else (None, the failure); the budget is told what the failure means."""
        circuit = deployment.circuit
        try:
            async with deployment.budget.admit(cost) as permit:
                self._stats.throttle_wait_seconds += permit.waited
                try:
                    outcome = await self._attempt(request.url, body, permit, deployment)
                except (openai.APIStatusError, *TRANSIENT_ERRORS) as exc:
                    if classify(exc) is Verdict.THROTTLED:
                        permit.throttled(exc.response.headers)  # type: ignore[union-attr]
                    else:
                        permit.failed()
                    return None, exc
        except InvalidResponse as exc:
            log.warning("item.invalid_response", custom_id=request.custom_id, detail=str(exc)[:300])
            outcome = exc.outcome
        except BaseException:
            if probe:
                circuit.probe_abandoned()
            raise
        circuit.answered(probe, ok=True)
        return outcome, None

    async def _after_transient(
        self, failure: BaseException, circuit: Circuit, probe: bool, spent: int
    ) -> int:
        """A transient failure: during an outage (open circuit) it costs the item nothing; else it spends
        one attempt, waits `retry_delay`, and past `--max-attempts` leaves the item Unfinished."""
        circuit.failed(probe, describe_failure(failure))
        self._stats.retries += 1
        if circuit.is_open:
            return spent
        spent += 1
        if spent >= self._max_attempts:
            raise Unfinished(
                f"{spent} attempts failed ({describe_failure(failure)}: {error_message(failure)}) "
                "while the deployment was otherwise answering; left for the next run"
            )
        await asyncio.sleep(retry_delay(failure, spent))
        return spent

    @staticmethod
    def _throttled(exc: openai.APIStatusError, deployment: Deployment, throttles: int) -> None:
        """A 429: the deployment's budget pauses for the server's wait (the router then sends the next
        attempt elsewhere, when the request reaches other deployments). A wait longer than the worker
        waits (a quota used up for the day) takes the deployment out of this run."""
        wait = server_wait_seconds(exc.response.headers)
        if wait is not None and wait > MAX_SERVER_WAIT_SECONDS:
            deployment.circuit.give_up(
                f"answered 429 asking to wait {wait:.0f} s, longer than the worker waits "
                f"({MAX_SERVER_WAIT_SECONDS:.0f} s): its quota is used up (a daily or monthly limit?); "
                "the next run resumes the items left"
            )
            return  # the router raises DeploymentDown when no other deployment is left
        deployment.budget.pause(wait if wait is not None else backoff_seconds(throttles))

    async def _attempt(
        self, url: str, body: dict[str, Any], permit: Permit, deployment: Deployment
    ) -> Outcome:
        self._stats.requests += 1
        counts = deployment.counts
        counts.calls += 1
        started = time.perf_counter()
        response = await deployment.client.post(
            url, cast_to=httpx2.Response, body=body, options={"timeout": self._timeout}
        )
        self._stats.latency.add(time.perf_counter() - started)
        counts.succeeded += 1
        try:
            permit.observe(response.headers)
            payload = _answer_object(response)
            usage = payload.get("usage")
            if isinstance(usage, dict):
                prompt, completion = (
                    _count(usage.get("prompt_tokens")),
                    _count(usage.get("completion_tokens")),
                )
                self._stats.prompt_tokens += prompt
                self._stats.completion_tokens += completion
                counts.prompt_tokens += prompt
                counts.completion_tokens += completion
        except Exception as exc:  # noqa: BLE001 - whatever the answer was, it was paid for: record it
            raise InvalidResponse(response, f"{type(exc).__name__}: {exc}") from None
        return Outcome(
            {
                "status_code": response.status_code,
                "request_id": _request_id(response.headers),
                "body": payload,
            },
            None,
        )

    async def _after_401(self, exc: openai.APIStatusError, reauths: int) -> None:
        if self._tokens is None:
            raise AccessDenied(
                "Azure OpenAI rejected the API key (AZURE_OPENAI_API_KEY): check that it is a current key of the "
                "resource at AZURE_OPENAI_ENDPOINT, or use Entra ID (--auth auto/managed-identity/...)"
            ) from None
        header = exc.response.request.headers.get("authorization", "")
        rejected = header.removeprefix("Bearer ").removeprefix("bearer ")
        renewed = await self._tokens.refresh(OPENAI_SCOPE, rejected)
        self._stats.token_refreshes = self._tokens.refreshes
        if reauths <= MAX_REAUTHS_PER_ITEM:
            if not renewed:  # the credential handed back the same token: give the service a moment
                await asyncio.sleep(backoff_seconds(reauths))
            return
        if not renewed:
            raise AccessDenied(
                f"Azure OpenAI keeps rejecting the token of {describe_principal(rejected)} ({error_message(exc)}) "
                "and the credential hands back the same token when asked for a new one: check that "
                "AZURE_OPENAI_ENDPOINT is the resource the identity is meant for, in the identity's tenant"
            ) from None
        raise AccessDenied(
            f"Azure OpenAI rejected a newly issued token for {describe_principal(rejected)} "
            f"({error_message(exc)}): check that AZURE_OPENAI_ENDPOINT is the resource the identity is "
            "meant for, in the identity's tenant"
        ) from None

    def _final(
        self, exc: openai.APIStatusError, verdict: Verdict, deployment: Deployment, named_by_input: bool
    ) -> Outcome:
        code = error_code(exc)
        if verdict is Verdict.FATAL:
            raise AccessDenied(
                f"Azure OpenAI refused the call ({code}: {error_message(exc)}): assign the 'Cognitive Services "
                "OpenAI User' role on the Azure OpenAI resource to the identity the worker runs as "
                "(`worker doctor` names it)"
            ) from None
        if verdict is Verdict.MISCONFIGURED and not deployment.circuit.verified:
            problem = self._misconfiguration(exc, code, deployment, named_by_input)
            if problem is not None:
                raise problem from None
        return Outcome(_service_response(exc), {"code": code, "message": error_message(exc)})

    def _misconfiguration(
        self, exc: openai.APIStatusError, code: str, deployment: Deployment, named_by_input: bool
    ) -> ConfigError | None:
        """A 404/OperationNotSupported from a deployment that never answered: which setting to fix, or
        None when only the lines naming that deployment are wrong (the others work)."""
        name = deployment.name
        if deployment.configured:  # a deployment of the job's pool: its entry is wrong, whoever named it
            at = deployment.endpoint or "AZURE_OPENAI_ENDPOINT"
            return ConfigError(
                f"the pool's deployment {name!r} at {at} answered {exc.status_code} {code} "
                f"({error_message(exc)}): fix its [[deployments]] entry (`name` is the deployment's name at "
                "`endpoint`, not the model name) or OPENAI_API_VERSION"
            )
        if code == "DeploymentNotFound":
            if named_by_input:
                return None
            return ConfigError(
                f"the deployment {name!r} does not exist at AZURE_OPENAI_ENDPOINT: set --deployment / "
                "AZURE_OPENAI_DEPLOYMENT to a deployment name (not a model name) of that resource"
            )
        if code == "OperationNotSupported":
            if named_by_input:
                return None
            return ConfigError(
                f"the deployment {name!r} does not support this operation ({error_message(exc)}): "
                "point --deployment / AZURE_OPENAI_DEPLOYMENT at a chat deployment (or an embeddings "
                "deployment for /embeddings lines)"
            )
        if named_by_input and self._router.any_verified:
            return None
        return ConfigError(
            f"Azure OpenAI answered {exc.status_code} {error_message(exc)!r} for deployment {name!r}: "
            "check OPENAI_API_VERSION / --api-version (a retired or mistyped version) and "
            "AZURE_OPENAI_ENDPOINT (https://RESOURCE.openai.azure.com, with no path)"
        )


def _answer_object(response: httpx2.Response) -> dict[str, Any]:
    payload = json.loads(response.content)
    if not isinstance(payload, dict):
        raise TypeError(f"a JSON {type(payload).__name__} instead of an object")
    return payload


def _count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
