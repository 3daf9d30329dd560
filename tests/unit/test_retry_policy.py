import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import openai
import pytest

from worker.calls import (
    MAX_SERVER_WAIT_SECONDS,
    Verdict,
    backoff_seconds,
    classify,
    error_code,
    retry_delay,
    server_wait_seconds,
)

REQUEST = httpx2.Request("POST", "https://example.openai.azure.com/openai/deployments/d/chat/completions")


def status_error(status: int, body: object) -> openai.APIStatusError:
    response = httpx2.Response(status, json=body, request=REQUEST)
    client = openai.AsyncAzureOpenAI(
        azure_endpoint="https://example.openai.azure.com", api_key="x", api_version="v"
    )
    return client._make_status_error_from_response(response)


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (429, {"error": {"code": "429", "message": "slow down"}}, Verdict.THROTTLED),
        (500, {"error": {"code": "InternalServerError"}}, Verdict.RETRY),
        (503, {}, Verdict.RETRY),
        (408, {}, Verdict.RETRY),
        (401, {"statusCode": 401, "message": "Unauthorized."}, Verdict.REAUTH),
        (403, {"error": {"code": "PermissionDenied"}}, Verdict.FATAL),
        (404, {"error": {"code": "DeploymentNotFound"}}, Verdict.MISCONFIGURED),
        (404, {"error": {"code": "404", "message": "Resource not found"}}, Verdict.MISCONFIGURED),
        (400, {"error": {"code": "OperationNotSupported"}}, Verdict.MISCONFIGURED),
        (409, {}, Verdict.RETRY),
        (502, {}, Verdict.RETRY),
        (400, {"error": {"code": "content_filter", "message": "filtered"}}, Verdict.FINAL),
        (400, {"error": {"code": "context_length_exceeded"}}, Verdict.FINAL),
    ],
)
def test_classify_status_errors(status: int, body: object, verdict: Verdict) -> None:
    assert classify(status_error(status, body)) is verdict


def test_classify_transport_errors() -> None:
    assert classify(openai.APITimeoutError(request=REQUEST)) is Verdict.RETRY
    assert classify(openai.APIConnectionError(request=REQUEST)) is Verdict.RETRY


def test_error_code_from_nested_and_flat_bodies() -> None:
    assert error_code(status_error(400, {"error": {"code": "content_filter"}})) == "content_filter"
    assert error_code(status_error(401, {"statusCode": 401, "message": "x"})) == "http_401"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "4"}, 4.0),
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "Mon, 99 Foo 2026"}, None),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
        ({"retry-after": "Mon, 99 Foo 20xx"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "later", "retry-after": "2"}, 2.0),
        ({"retry-after-ms": "-5"}, 0.0),
    ],
)
def test_server_wait_prefers_milliseconds(headers: dict[str, str], expected: float | None) -> None:
    assert server_wait_seconds(headers) == expected


def test_server_wait_accepts_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = server_wait_seconds({"retry-after": when})
    assert wait is not None
    assert 25 < wait <= 30


def test_backoff_grows_and_is_capped_with_jitter() -> None:
    rng = random.Random(7)
    waits = [backoff_seconds(n, rng) for n in range(1, 12)]
    assert 0.25 <= waits[0] <= 0.5
    assert 2.0 <= waits[3] <= 4.0
    assert all(w <= 30 for w in waits)
    assert waits[-1] >= 15


def test_retry_delay_takes_the_servers_wait_unless_it_is_too_long() -> None:
    asked = status_error(503, {})
    asked.response.headers["retry-after"] = "7"
    assert retry_delay(asked, 1) == 7.0
    daily = status_error(503, {})
    daily.response.headers["retry-after"] = str(int(MAX_SERVER_WAIT_SECONDS) * 10)
    assert retry_delay(daily, 1) <= 0.5  # backoff instead of hours
    assert 0.25 <= retry_delay(openai.APITimeoutError(request=REQUEST), 1) <= 0.5
