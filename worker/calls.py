"""One request → one Azure OpenAI call, retried at this one layer (the SDK's own retries are off).

Every failure is classified once, here (`classify`):
- RETRY: 429, 408, 409, 5xx, timeouts, connection errors (to Azure OpenAI or to the token endpoint). Wait what the service asked
  (`retry-after-ms`, then `retry-after`; a 429 pauses the whole deployment), else jittered exponential
  backoff; at most `max_attempts` attempts, then a final error record.
- REAUTH: 401 with an Entra token. The shared cache fetches a *fresh* token and the call is retried;
  a newly issued token rejected again means the identity is wrong: the run stops with exit 2.
- FINAL: other 4xx (content_filter, invalid request, ...): recorded at once as an error line, never retried.
- FATAL: the identity lacks a role (403), the configured deployment does not exist, the key is wrong:
  no item can succeed, so the run stops with exit 2 and records nothing for the item.
"""

from __future__ import annotations

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
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from worker.errors import AccessDenied, ConfigError
from worker.formats import Request
from worker.identity import OPENAI_SCOPE, SharedTokens, describe_principal
from worker.metrics import RunStats
from worker.ratelimit import Budgets, Permit, estimate_tokens

log = structlog.get_logger("worker.calls")

BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0
MAX_SERVER_WAIT_SECONDS = 300.0
MAX_REAUTHS_PER_ITEM = 2


class Verdict(enum.Enum):
    RETRY = "retry"
    REAUTH = "reauth"
    FINAL = "final"
    FATAL = "fatal"


def classify(exc: BaseException) -> Verdict:
    """What to do about a failed attempt."""
    if isinstance(
        exc, openai.APITimeoutError | openai.APIConnectionError | ServiceRequestError | ServiceResponseError
    ):
        return (
            Verdict.RETRY
        )  # the last two: the token endpoint was unreachable (e.g. the identity endpoint restarting)
    if isinstance(exc, ConfigError):
        return Verdict.FATAL
    if not isinstance(exc, openai.APIStatusError):
        return Verdict.FATAL
    status = exc.status_code
    if status == 401:
        return Verdict.REAUTH
    if status == 403:
        return Verdict.FATAL
    if status == 404 and error_code(exc) == "DeploymentNotFound":
        return Verdict.FATAL
    if status in (408, 409, 429) or status >= 500:
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
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def error_code(exc: openai.APIStatusError) -> str:
    """The service's error code (`error.code`), else `http_<status>`."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("code"):
            return str(inner["code"])
    return f"http_{exc.status_code}"


def error_message(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and inner.get("message"):
                return str(inner["message"])
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "the request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"could not connect to Azure OpenAI ({type(exc.__cause__).__name__ if exc.__cause__ else 'connection error'})"
    return str(exc)


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

    @property
    def succeeded(self) -> bool:
        return self.error is None


class _Reauth(Exception):
    """Internal: a 401 after which a fresh token is in place; retry now."""


class Caller:
    """Makes the calls of a run through one AsyncAzureOpenAI client and one token cache."""

    def __init__(
        self,
        client: openai.AsyncAzureOpenAI,
        *,
        tokens: SharedTokens | None,
        budgets: Budgets,
        stats: RunStats,
        default_deployment: str | None,
        max_attempts: int,
        request_timeout: float,
    ) -> None:
        self._client = client
        self._tokens = tokens
        self._budgets = budgets
        self._stats = stats
        self._default_deployment = default_deployment
        self._max_attempts = max_attempts
        self._timeout = request_timeout

    def deployment_for(self, request: Request) -> tuple[str, bool]:
        """The deployment to call and whether the input itself named it (`body.model`)."""
        model = request.body.get("model")
        if isinstance(model, str) and model:
            return model, True
        if not self._default_deployment:
            raise ConfigError(
                "missing setting: --deployment or AZURE_OPENAI_DEPLOYMENT (the Azure OpenAI deployment "
                f"to call; {request.custom_id} names no `model`)"
            )
        return self._default_deployment, False

    async def call(self, request: Request) -> Outcome:
        """Call until success, a final error, or the attempt cap. Raises ConfigError for FATAL failures."""
        deployment, named_by_input = self.deployment_for(request)
        body = {**request.body, "model": deployment}
        cost = estimate_tokens(body)
        budget = self._budgets[deployment]
        reauths = 0

        def should_retry(exc: BaseException) -> bool:
            return isinstance(exc, _Reauth) or classify(exc) is Verdict.RETRY

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Reauth):
                return 0.0
            hint = (
                server_wait_seconds(exc.response.headers) if isinstance(exc, openai.APIStatusError) else None
            )
            if hint is not None and hint <= MAX_SERVER_WAIT_SECONDS:
                if isinstance(exc, openai.RateLimitError):
                    budget.pause(hint)
                    return 0.0  # the budget holds this request (and every other) until the pause ends
                return hint
            return backoff_seconds(state.attempt_number)

        def before_sleep(state: RetryCallState) -> None:
            self._stats.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, openai.RateLimitError):
                self._stats.throttled += 1
            log.debug(
                "call.retry",
                custom_id=request.custom_id,
                attempt=state.attempt_number,
                error=type(exc).__name__,
            )

        attempts = 0

        def out_of_attempts(state: RetryCallState) -> bool:
            return attempts - reauths >= self._max_attempts

        retrying = AsyncRetrying(
            stop=out_of_attempts,
            wait=wait,
            retry=retry_if_exception(should_retry),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    try:
                        async with budget.admit(cost) as permit:
                            self._stats.throttle_wait_seconds += permit.waited
                            return await self._attempt(request.url, body, permit)
                    except openai.AuthenticationError as exc:
                        reauths += 1
                        await self._after_401(exc, reauths)
                        raise _Reauth from exc
        except openai.APIStatusError as exc:
            return self._final_failure(exc, deployment, named_by_input)
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            code = "timeout" if isinstance(exc, openai.APITimeoutError) else "connection_error"
            return Outcome(
                None, {"code": code, "message": f"{error_message(exc)} (after {attempts} attempts)"}
            )
        raise AssertionError("unreachable")

    async def _attempt(self, url: str, body: dict[str, Any], permit: Permit) -> Outcome:
        self._stats.requests += 1
        started = time.perf_counter()
        response = await self._client.post(
            url, cast_to=httpx2.Response, body=body, options={"timeout": self._timeout}
        )
        self._stats.latency.add(time.perf_counter() - started)
        permit.observe(response.headers)
        payload = json.loads(response.content)
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(usage, dict):
            self._stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self._stats.completion_tokens += int(usage.get("completion_tokens") or 0)
        return Outcome(
            {
                "status_code": response.status_code,
                "request_id": _request_id(response.headers),
                "body": payload,
            },
            None,
        )

    async def _after_401(self, exc: openai.AuthenticationError, reauths: int) -> None:
        if self._tokens is None:
            raise AccessDenied(
                "Azure OpenAI rejected the API key (AZURE_OPENAI_API_KEY): check that it is a current key of the "
                "resource at AZURE_OPENAI_ENDPOINT, or use Entra ID (--auth auto/managed-identity/...)"
            ) from None
        header = exc.response.request.headers.get("authorization", "")
        rejected = header.removeprefix("Bearer ").removeprefix("bearer ")
        renewed = await self._tokens.refresh(OPENAI_SCOPE, rejected)
        self._stats.token_refreshes = self._tokens.refreshes
        if not renewed or reauths > MAX_REAUTHS_PER_ITEM:
            raise AccessDenied(
                f"Azure OpenAI rejected a newly issued token for {describe_principal(rejected)} "
                f"({error_message(exc)}): check that AZURE_OPENAI_ENDPOINT is the resource the identity is "
                "meant for, in the identity's tenant"
            ) from None

    def _final_failure(self, exc: openai.APIStatusError, deployment: str, named_by_input: bool) -> Outcome:
        verdict = classify(exc)
        code = error_code(exc)
        if verdict is Verdict.FATAL and exc.status_code == 403:
            raise AccessDenied(
                f"Azure OpenAI refused the call ({code}: {error_message(exc)}): assign the 'Cognitive Services "
                "OpenAI User' role on the Azure OpenAI resource to the identity the worker runs as "
                "(`worker doctor` names it)"
            ) from None
        if verdict is Verdict.FATAL and not named_by_input:
            raise ConfigError(
                f"the deployment {deployment!r} does not exist at AZURE_OPENAI_ENDPOINT: set --deployment / "
                "AZURE_OPENAI_DEPLOYMENT to a deployment name (not a model name) of that resource"
            ) from None
        return Outcome(_service_response(exc), {"code": code, "message": error_message(exc)})
