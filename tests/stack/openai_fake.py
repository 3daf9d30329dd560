"""A fake Azure OpenAI resource: chat completions and embeddings with Entra or api-key auth, quota,
latency and fault injection, plus an unauthenticated admin API under /_admin/.

Answers are deterministic so tests can match them to prompts: the assistant says "ECHO: " followed by
the text of the last user message. Token counts are ceil(characters / 4).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import openai_bodies as bodies
from .ratelimit import UNLIMITED_REMAINING, Decision, SlidingWindowLimiter
from .settings import SettingsError, as_json, merge
from .tokens import COGNITIVE_SERVICES_AUDIENCE, InvalidTokenError, TokenMint

JSON_TYPE = "application/json"
_REQUEST_STATS: contextvars.ContextVar[OpenAIStats] = contextvars.ContextVar("request_stats")
FILTER_PROMPT_MARKER = "FILTER_ME"
FILTER_OUTPUT_MARKER = "FILTER_OUTPUT"
FAIL_PROMPT_MARKER = "ALWAYS_500"  # a prompt holding this always gets a 500 (a "poison" item)


@dataclass
class OpenAIConfig:
    """Behaviour of the fake; every field can be changed at run time through POST /_admin/config."""

    deployments: list[str] = field(default_factory=lambda: ["gpt-4o-mini", "text-embedding-3-small"])
    api_key: str = ""
    """Accepted `api-key` header value ("" accepts no key)."""
    rpm: int | None = None
    """Requests per minute per deployment (enforced as rpm/6 per 10 s); None = unlimited."""
    tpm: int | None = None
    """Tokens per minute per deployment (enforced as tpm/6 per 10 s); None = unlimited."""
    default_max_tokens: int = 16
    """Completion tokens charged to the quota when a request sets neither max_tokens nor
    max_completion_tokens."""
    latency_ms: float = 0.0
    """Base latency of a successful answer, in milliseconds."""
    latency_per_token_ms: float = 0.0
    """Extra latency per completion token, in milliseconds."""
    jitter_ms: float = 0.0
    """Uniform random extra latency in [0, jitter_ms), in milliseconds."""
    force_401: int = 0
    """The next N API requests get the Entra-shaped 401."""
    force_429: int = 0
    """The next N API requests get a 429."""
    force_429_retry_after_ms: int = 1000
    """retry-after-ms of a forced 429, in milliseconds."""
    error_rate: float = 0.0
    """Probability (0..1) of answering 500 or 503 instead."""
    hang_rate: float = 0.0
    """Probability (0..1) of sleeping `hang_seconds` before answering."""
    hang_seconds: float = 30.0
    """How long a hanging request sleeps, in seconds."""
    seed: int = 0
    """Seed of the RNG behind error_rate, hang_rate and jitter."""
    embedding_dimensions: int = 8
    """Length of the deterministic embedding vectors."""
    outage_status: int = 0
    """While non-zero, every API request is answered with this status (503: the ServiceUnavailable body)."""
    outage_drop: bool = False
    """While true, every API request has its connection dropped without an answer."""
    api_versions: list[str] = field(default_factory=list)
    """Accepted api-version values; any other gets 404 Resource not found. Empty = accept any."""
    force_429_remaining: int = UNLIMITED_REMAINING
    """x-ratelimit-remaining-tokens and -requests of a forced 429 (0: the window is full)."""
    rate_headers: bool = True
    """Send x-ratelimit-* headers; False answers as behind a gateway that strips them (429s keep their
    retry-after)."""
    token_window_s: float = 10.0
    """The window tokens are counted over, and x-ratelimit-remaining-tokens counts: 10 (Azure: tpm/6 per
    10 s) or 60 (the public aoai-api-simulator: tpm per 60 s). Requests stay rpm/6 per 10 s."""
    retry_after_ms: bool = True
    """Send retry-after-ms on a 429; False sends only retry-after in whole seconds (as the simulator)."""
    deployment_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per deployment {"tpm": ..., "rpm": ...}: its own quota instead of `tpm`/`rpm` (a key left out: unlimited)."""
    outage_deployments: list[str] = field(default_factory=list)
    """These deployments answer every request with 503 (an outage of one deployment, as in one region)."""
    throttle_deployments: list[str] = field(default_factory=list)
    """These deployments answer every request with 429 and `force_429_retry_after_ms`."""


@dataclass
class OpenAIStats:
    """Counters over the API requests (admin calls are not counted)."""

    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_deployment: Counter[str] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    by_auth: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    successes: int = 0
    repeats: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    first_request_at: float | None = None
    last_request_at: float | None = None
    tokens_by_second: Counter[int] = field(default_factory=Counter)
    successes_by_second: Counter[int] = field(default_factory=Counter)
    answered: set[str] = field(default_factory=set)
    by_host: Counter[str] = field(default_factory=Counter)
    """API requests by the host they were sent to (the Host header without its port): a second
    "endpoint" is this fake reached under another name (localhost vs 127.0.0.1)."""
    by_deployment_status: Counter[str] = field(default_factory=Counter)
    """"<deployment> <status>" -> answers."""
    first_by_deployment_status: dict[str, int] = field(default_factory=dict)
    """"<deployment> <status>" -> the sequence number (1-based, over all API requests) of the first such answer."""

    def as_json(self) -> dict[str, Any]:
        """Stats as JSON; times are Unix epoch seconds, tokens_by_second maps epoch second -> tokens
        (successes_by_second -> successful answers)."""
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "by_deployment": dict(self.by_deployment),
            "by_operation": dict(self.by_operation),
            "by_auth": dict(self.by_auth),
            "throttled": self.throttled,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "successes": self.successes,
            "repeats": self.repeats,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
            "tokens_by_second": {str(second): n for second, n in sorted(self.tokens_by_second.items())},
            "by_host": dict(self.by_host),
            "by_deployment_status": dict(self.by_deployment_status),
            "first_by_deployment_status": dict(self.first_by_deployment_status),
            "successes_by_second": {str(second): n for second, n in sorted(self.successes_by_second.items())},
        }


class _Reply(Exception):
    """Raised inside a handler to answer early with an error response."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def _text_of(content: object) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _tokens(chars: int) -> int:
    """Token estimate for `chars` characters: ceil(chars / 4)."""
    return -(-chars // 4)


class FakeAzureOpenAI:
    """The aiohttp application of the fake and its mutable state (config, stats, quota windows)."""

    def __init__(self, mint: TokenMint, config: OpenAIConfig) -> None:
        self.mint = mint
        self.initial_config = config
        self.config = merge(config, {})
        self.stats = OpenAIStats()
        self._limiters: dict[str, SlidingWindowLimiter] = {}
        self._rng = random.Random(config.seed)
        from .openai_batches import FakeBatches  # the Batch API: files and batches (its own module)

        self.batches = FakeBatches(self)

    def app(self) -> web.Application:
        """The web application: the OpenAI data plane and the admin API."""
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self._embeddings)
        app.router.add_get("/_admin/stats", self._admin_stats)
        app.router.add_get("/_admin/config", self._admin_get_config)
        app.router.add_post("/_admin/config", self._admin_config)
        app.router.add_post("/_admin/reset", self._admin_reset)
        self.batches.add_routes(app)
        return app

    def check_batch_request(self, request: web.Request) -> None:
        """The data plane's outage, api-version and authentication checks, for the Batch API's files and
        batches endpoints (raises _Reply)."""
        if self.config.outage_status:
            raise _Reply(self.config.outage_status, bodies.SERVICE_UNAVAILABLE_503)
        api_version = request.query.get("api-version")
        if not api_version or (self.config.api_versions and api_version not in self.config.api_versions):
            raise _Reply(404, bodies.RESOURCE_NOT_FOUND)
        self._authenticate(request)

    # ---- data plane -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._serve(request, "chat")

    async def _embeddings(self, request: web.Request) -> web.Response:
        return await self._serve(request, "embeddings")

    async def _serve(self, request: web.Request, operation: str) -> web.Response:
        stats = self.stats
        _REQUEST_STATS.set(stats)  # this request counts here, even when it ends after a reset
        now = time.time()
        stats.requests += 1
        stats.last_request_at = now
        if stats.first_request_at is None:
            stats.first_request_at = now
        stats.by_operation[operation] += 1
        sequence = stats.requests
        stats.by_host[(request.host or "").rsplit(":", 1)[0]] += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await self._answer(request, operation)
        except _Reply as reply:
            response = _json_response(reply.status, reply.body, reply.headers)
        finally:
            stats.in_flight -= 1
        stats.by_status[str(response.status)] += 1
        deployment = request.match_info.get("deployment")
        if deployment is not None:
            key = f"{deployment} {response.status}"
            stats.by_deployment_status[key] += 1
            stats.first_by_deployment_status.setdefault(key, sequence)
        return response

    async def _answer(self, request: web.Request, operation: str) -> web.Response:
        config = self.config
        if config.outage_drop and request.transport is not None:
            request.transport.abort()
            raise _Reply(503, bodies.SERVICE_UNAVAILABLE_503)  # counted; nobody receives it
        if config.outage_status:
            raise _Reply(config.outage_status, bodies.SERVICE_UNAVAILABLE_503)
        api_version = request.query.get("api-version")
        if not api_version or (config.api_versions and api_version not in config.api_versions):
            raise _Reply(404, bodies.RESOURCE_NOT_FOUND)
        deployment = request.match_info["deployment"]
        if deployment not in config.deployments:
            raise _Reply(404, bodies.DEPLOYMENT_NOT_FOUND)
        self._request_stats.by_deployment[deployment] += 1
        if deployment in config.outage_deployments:
            raise _Reply(503, bodies.SERVICE_UNAVAILABLE_503)
        self._authenticate(request)
        try:
            body = json.loads(await request.read())
        except ValueError as error:
            raise _Reply(400, bodies.invalid_request_400(f"Invalid JSON body: {error}")) from None
        if not isinstance(body, dict):
            raise _Reply(400, bodies.invalid_request_400("The request body must be a JSON object."))
        if (operation == "chat") == ("embedding" in deployment):
            raise _Reply(400, bodies.operation_not_supported(operation, deployment))
        if operation == "chat":
            return await self._chat_answer(body, deployment, api_version)
        return await self._embeddings_answer(body, deployment, api_version)

    def _authenticate(self, request: web.Request) -> None:
        config = self.config
        if config.force_401 > 0:
            config.force_401 -= 1
            raise _Reply(401, bodies.ENTRA_401)
        key = request.headers.get("api-key")
        if key is not None:
            if not config.api_key or key != config.api_key:
                raise _Reply(401, bodies.API_KEY_401)
            self._request_stats.by_auth["api-key"] += 1
            return
        authorization = request.headers.get("Authorization")
        if authorization is None:
            raise _Reply(401, bodies.API_KEY_401)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise _Reply(401, bodies.ENTRA_401)
        try:
            self.mint.verify(token.strip(), COGNITIVE_SERVICES_AUDIENCE)
        except InvalidTokenError:
            raise _Reply(401, bodies.ENTRA_401) from None
        self._request_stats.by_auth["bearer"] += 1

    async def _chat_answer(self, body: dict[str, Any], deployment: str, api_version: str) -> web.Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Reply(400, bodies.invalid_request_400("'messages' must be a non-empty array."))
        texts = [_text_of(m.get("content")) if isinstance(m, dict) else "" for m in messages]
        prompt = "".join(texts)
        last_user = next(
            (text for m, text in zip(reversed(messages), reversed(texts), strict=True) if _is_user(m)), ""
        )
        prompt_tokens = _tokens(len(prompt))
        max_tokens = (
            body.get("max_tokens") or body.get("max_completion_tokens") or self.config.default_max_tokens
        )
        if not isinstance(max_tokens, int):
            raise _Reply(400, bodies.invalid_request_400("'max_tokens' must be an integer."))
        decision = self._admit(deployment, "chat", api_version, prompt_tokens + max_tokens)
        await self._maybe_fail()
        if FILTER_PROMPT_MARKER in prompt:
            raise _Reply(400, bodies.PROMPT_FILTERED_400)
        if FAIL_PROMPT_MARKER in prompt:
            raise _Reply(500, bodies.SERVER_ERROR_500)
        content = "ECHO: " + last_user
        completion_tokens = _tokens(len(content))
        await self._sleep_latency(completion_tokens)
        answer = bodies.chat_completion(
            deployment,
            content,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            output_filtered=FILTER_OUTPUT_MARKER in prompt,
        )
        stats = self._request_stats
        if last_user in stats.answered:
            stats.repeats += 1
        else:
            stats.answered.add(last_user)
        self._count_success(prompt_tokens, completion_tokens)
        return _json_response(200, answer, self._quota_headers(decision))

    async def _embeddings_answer(
        self, body: dict[str, Any], deployment: str, api_version: str
    ) -> web.Response:
        raw = body.get("input")
        items: list[object] = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        texts: list[str] = []
        prompt_tokens = 0
        for item in items:
            if isinstance(item, str):
                texts.append(item)
                prompt_tokens += _tokens(len(item))
            elif isinstance(item, list) and all(isinstance(token, int) for token in item):
                texts.append(json.dumps(item))
                prompt_tokens += len(item)
            else:
                raise _Reply(
                    400, bodies.invalid_request_400("'input' must be a string or an array of strings.")
                )
        decision = self._admit(deployment, "embeddings", api_version, prompt_tokens)
        await self._maybe_fail()
        await self._sleep_latency(0)
        answer = bodies.embedding_list(
            deployment,
            texts,
            dimensions=body.get("dimensions") or self.config.embedding_dimensions,
            as_base64=body.get("encoding_format") == "base64",
            prompt_tokens=prompt_tokens,
        )
        self._count_success(prompt_tokens, 0)
        return _json_response(200, answer, self._quota_headers(decision))

    def _admit(self, deployment: str, operation: str, api_version: str, cost: int) -> Decision:
        config = self.config
        if config.force_429 > 0 or deployment in config.throttle_deployments:
            if deployment not in config.throttle_deployments:
                config.force_429 -= 1
            retry_after_ms = config.force_429_retry_after_ms
            remaining = config.force_429_remaining
            decision = Decision(False, remaining, remaining, retry_after_ms, "tokens")
        else:
            limiter = self._limiters.get(deployment)
            if limiter is None or limiter.token_window_s != config.token_window_s:
                limiter = self._limiters[deployment] = SlidingWindowLimiter(
                    token_window_s=config.token_window_s
                )
            rpm, tpm = config.rpm, config.tpm
            if deployment in config.deployment_limits:
                rpm = config.deployment_limits[deployment].get("rpm")
                tpm = config.deployment_limits[deployment].get("tpm")
            decision = limiter.acquire(cost, rpm=rpm, tpm=tpm, now=time.monotonic())
            if decision.admitted:
                return decision
        self._request_stats.throttled += 1
        retry_after_s = math.ceil(decision.retry_after_ms / 1000)
        headers = {**self._quota_headers(decision), "retry-after": str(retry_after_s)}
        if config.retry_after_ms:
            headers["retry-after-ms"] = str(decision.retry_after_ms)
        raise _Reply(
            429, bodies.rate_limited_429(operation, api_version, decision.limit, retry_after_s), headers
        )

    def _quota_headers(self, decision: Decision) -> dict[str, str]:
        return _quota_headers(decision) if self.config.rate_headers else {}

    async def _maybe_fail(self) -> None:
        config = self.config
        if config.error_rate and self._rng.random() < config.error_rate:
            if self._rng.random() < 0.5:
                raise _Reply(500, bodies.SERVER_ERROR_500)
            raise _Reply(503, bodies.SERVICE_UNAVAILABLE_503)
        if config.hang_rate and self._rng.random() < config.hang_rate:
            await asyncio.sleep(config.hang_seconds)

    async def _sleep_latency(self, completion_tokens: int) -> None:
        config = self.config
        delay_ms = config.latency_ms + config.latency_per_token_ms * completion_tokens
        if config.jitter_ms:
            delay_ms += self._rng.uniform(0, config.jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

    @property
    def _request_stats(self) -> OpenAIStats:
        """The counters of the request being answered: those current when it arrived. A request still
        running when a test resets the fake (a killed worker's call, a hang) does not count in the next
        test's."""
        return _REQUEST_STATS.get(None) or self.stats

    def _count_success(self, prompt_tokens: int, completion_tokens: int) -> None:
        stats = self._request_stats
        stats.successes += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        second = int(time.time())
        stats.tokens_by_second[second] += prompt_tokens + completion_tokens
        stats.successes_by_second[second] += 1

    # ---- admin ------------------------------------------------------------------------------------

    async def _admin_stats(self, _request: web.Request) -> web.Response:
        return _json_response(200, self.stats.as_json())

    async def _admin_get_config(self, _request: web.Request) -> web.Response:
        return _json_response(200, as_json(self.config))

    async def _admin_config(self, request: web.Request) -> web.Response:
        try:
            updates = json.loads(await request.read())
            if not isinstance(updates, dict):
                raise SettingsError("the body must be a JSON object of settings")
            self.config = merge(self.config, updates)
        except (ValueError, SettingsError) as error:
            return _json_response(400, {"error": str(error)})
        if "seed" in updates:
            self._rng = random.Random(self.config.seed)
        return _json_response(200, as_json(self.config))

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.config = merge(self.initial_config, {})
        self.stats = OpenAIStats()
        self._limiters.clear()
        self._rng = random.Random(self.config.seed)
        self.batches.reset()
        return _json_response(200, as_json(self.config))


def _is_user(message: object) -> bool:
    return isinstance(message, dict) and message.get("role") == "user"


def _quota_headers(decision: Decision) -> dict[str, str]:
    return {
        "x-ratelimit-remaining-requests": str(decision.remaining_requests),
        "x-ratelimit-remaining-tokens": str(decision.remaining_tokens),
    }


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    request_id = str(uuid.uuid4())
    all_headers = {"apim-request-id": request_id, "x-request-id": request_id}
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status, body=json.dumps(body).encode(), headers=all_headers, content_type=JSON_TYPE
    )
