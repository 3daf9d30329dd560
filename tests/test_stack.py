"""The local Azure stack speaks the real protocols: the real SDKs run against it over HTTPS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import webbrowser
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity import CredentialUnavailableError, InteractiveBrowserCredential
from azure.identity.aio import (
    AzureCliCredential,
    CertificateCredential,
    ClientAssertionCredential,
    ClientSecretCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
    get_bearer_token_provider,
)
from azure.storage.blob.aio import BlobServiceClient
from cryptography.hazmat.primitives import serialization
from openai.types.chat import ChatCompletionMessageParam

from tests.stack import LocalStack
from tests.stack.admin import AdminError
from tests.stack.azurite import free_port
from tests.stack.directory import AZURE_CLI_CLIENT_ID, FEDERATION_AUDIENCE, b64url, self_signed_certificate
from tests.stack.openai_bodies import embedding_vector

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.stack

STORAGE_SCOPE = "https://storage.azure.com/.default"
OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"
ENTRA_401_BODY = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired.",
}


@pytest.fixture
def msi_env(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Container Apps managed-identity environment, pointing at the fake."""
    for name in (
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_OPENAI_AD_TOKEN",
        "MSI_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", stack.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", stack.identity_header)


@contextlib.asynccontextmanager
async def azure_openai(
    stack: LocalStack,
    *,
    token_provider: Callable[[], Awaitable[str]] | None = None,
    api_key: str | None = None,
    timeout_s: float = 10.0,
) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    client = openai.AsyncAzureOpenAI(
        azure_endpoint=stack.openai_endpoint,
        api_version=stack.api_version,
        azure_ad_token_provider=token_provider,
        api_key=api_key,
        http_client=openai.DefaultAioHttpClient(verify=stack.ssl_context()),
        max_retries=0,
        timeout=timeout_s,
    )
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def entra_openai(
    stack: LocalStack, *, timeout_s: float = 10.0
) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    """An Azure OpenAI client authenticated by the user-assigned managed identity."""
    async with ManagedIdentityCredential(client_id=stack.user_assigned_client_id) as credential:
        provider = get_bearer_token_provider(credential, OPENAI_SCOPE)
        async with azure_openai(stack, token_provider=provider, timeout_s=timeout_s) as client:
            yield client


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def claims_of(token: str) -> dict[str, object]:
    decoded: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return decoded


# ---- managed identity --------------------------------------------------------------------------------


@pytest.mark.usefixtures("msi_env")
async def test_user_assigned_identity_gets_a_new_token_per_request(stack: LocalStack) -> None:
    async with ManagedIdentityCredential(client_id=stack.user_assigned_client_id) as credential:
        token = await credential.get_token(STORAGE_SCOPE)
    claims = claims_of(token.token)
    assert claims["appid"] == stack.user_assigned_client_id
    assert claims["aud"] == "https://storage.azure.com"
    assert claims["iss"] == f"https://sts.windows.net/{stack.tenant_id}/"
    assert abs(token.expires_on - (time.time() + 3600)) < 60
    stats = stack.identity.stats()
    assert stats["by_status"] == {"200": 1}
    assert stats["issued"] == [
        {"source": "msi", "audience": "https://storage.azure.com", "principal": "user-assigned", "count": 1}
    ]


@pytest.mark.usefixtures("msi_env")
async def test_system_assigned_identity_is_used_without_client_id(stack: LocalStack) -> None:
    async with ManagedIdentityCredential() as credential:
        first = await credential.get_token(OPENAI_SCOPE)
    async with ManagedIdentityCredential() as credential:
        second = await credential.get_token(OPENAI_SCOPE)
    assert claims_of(first.token)["appid"] == stack.system_assigned_client_id
    assert claims_of(first.token)["aud"] == "https://cognitiveservices.azure.com"
    assert claims_of(first.token)["jti"] != claims_of(second.token)["jti"]


@pytest.mark.usefixtures("msi_env")
async def test_unknown_client_id_is_refused(stack: LocalStack) -> None:
    async with ManagedIdentityCredential(client_id=str(uuid.uuid4())) as credential:
        with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
            await credential.get_token(STORAGE_SCOPE)
    assert stack.identity.stats()["by_status"] == {"400": 1}


async def test_wrong_identity_header_is_refused(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDENTITY_ENDPOINT", stack.identity_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    async with ManagedIdentityCredential() as credential:
        with pytest.raises(ClientAuthenticationError):
            await credential.get_token(STORAGE_SCOPE)
    assert stack.identity.stats()["by_status"] == {"401": 1}


async def test_identity_outage_knobs(stack: LocalStack) -> None:
    url = f"{stack.identity_endpoint}?api-version=2019-08-01&resource=https://storage.azure.com"
    headers = {"X-IDENTITY-HEADER": stack.identity_header}
    stack.identity.configure(fail_next=1)
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers=headers) as failed:
            assert failed.status == 500
        async with session.get(url, headers=headers) as recovered:
            assert recovered.status == 200
            body = await recovered.json()
        assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
        assert body["resource"] == "https://storage.azure.com"
        assert isinstance(body["expires_on"], str)
        stack.identity.configure(down=True)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(url, headers=headers) as dropped:
                await dropped.read()


# ---- Azurite over HTTPS with OAuth -----------------------------------------------------------------


@pytest.mark.usefixtures("msi_env")
async def test_blob_round_trip_with_managed_identity(stack: LocalStack) -> None:
    container = f"c{uuid.uuid4().hex[:12]}"
    async with (
        ManagedIdentityCredential(client_id=stack.user_assigned_client_id) as credential,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_context())) as session,
        BlobServiceClient(
            stack.account_url,
            credential=credential,
            transport=AioHttpTransport(session=session, session_owner=False),
        ) as service,
    ):
        await service.create_container(container)
        blob = service.get_blob_client(container, "prompts/0001.jsonl")
        await blob.upload_blob(b'{"prompt": "hello"}\n')
        downloaded = await (await blob.download_blob()).readall()
        names = [
            b.name
            async for b in service.get_container_client(container).list_blobs(name_starts_with="prompts/")
        ]
    assert downloaded == b'{"prompt": "hello"}\n'
    assert names == ["prompts/0001.jsonl"]
    assert stack.identity.stats()["issued"][0]["audience"] == "https://storage.azure.com"
    assert stack.blob_url(container, "prompts/") == f"{stack.account_url}/{container}/prompts/"


def test_sync_blob_service_and_azurite_restart_keep_data(stack: LocalStack) -> None:
    with stack.blob_service() as service:
        service.create_container("restart-check")
        service.get_blob_client("restart-check", "a.txt").upload_blob(b"kept")
    stack.restart_azurite()
    with stack.blob_service() as service:
        assert service.get_blob_client("restart-check", "a.txt").download_blob().readall() == b"kept"


# ---- Azure OpenAI ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("msi_env")
async def test_chat_completion_with_entra_token(stack: LocalStack) -> None:
    async with entra_openai(stack) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=stack.deployment, messages=ask("What is 2+2?")
        )
        completion = raw.parse()
        parts = await client.chat.completions.create(
            model=stack.deployment,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        )
    assert completion.choices[0].message.content == "ECHO: What is 2+2?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == math.ceil(len("Be brief.What is 2+2?") / 4)
    assert completion.usage.completion_tokens == math.ceil(len("ECHO: What is 2+2?") / 4)
    assert raw.headers["x-ratelimit-remaining-requests"].isdigit()
    assert uuid.UUID(raw.headers["apim-request-id"])
    assert parts.choices[0].message.content == "ECHO: ab"
    stats = stack.openai.stats()
    assert stats["requests"] == 2
    assert stats["successes"] == 2
    assert stats["by_auth"] == {"bearer": 2}
    assert stats["repeats"] == 0
    issued = stack.identity.stats()["issued"]
    assert issued == [
        {
            "source": "msi",
            "audience": "https://cognitiveservices.azure.com",
            "principal": "user-assigned",
            "count": 1,
        }
    ]


@pytest.mark.usefixtures("msi_env")
async def test_revoked_token_gets_the_entra_401(stack: LocalStack) -> None:
    async with entra_openai(stack) as client:
        await client.chat.completions.create(model=stack.deployment, messages=ask("before"))
        stack.identity.revoke_all()
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("after"))
    assert caught.value.response.json() == ENTRA_401_BODY
    assert stack.openai.stats()["by_status"] == {"200": 1, "401": 1}


async def test_storage_token_is_rejected_by_openai(stack: LocalStack) -> None:
    storage_token = stack.storage_credential().get_token(STORAGE_SCOPE).token

    async def provider() -> str:
        return storage_token

    async with azure_openai(stack, token_provider=provider) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("wrong audience"))
    assert caught.value.response.json() == ENTRA_401_BODY


@pytest.mark.usefixtures("msi_env")
async def test_forced_429_carries_retry_after(stack: LocalStack) -> None:
    stack.openai.configure(force_429=1, force_429_retry_after_ms=1500)
    async with entra_openai(stack) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("throttle me"))
        after = await client.chat.completions.create(model=stack.deployment, messages=ask("throttle me"))
    headers = caught.value.response.headers
    assert headers["retry-after-ms"] == "1500"
    assert headers["retry-after"] == "2"
    assert "exceeded token rate limit" in caught.value.response.json()["error"]["message"]
    assert after.choices[0].message.content == "ECHO: throttle me"
    assert stack.openai.stats()["throttled"] == 1


async def test_sliding_window_quota(stack: LocalStack) -> None:
    stack.openai.configure(rpm=12)  # 2 requests per 10 s window
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        for text in ("one", "two"):
            await client.chat.completions.create(model=stack.deployment, messages=ask(text))
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("three"))
    retry_after_ms = int(caught.value.response.headers["retry-after-ms"])
    assert 9000 < retry_after_ms <= 10000
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "exceeded call rate limit" in caught.value.response.json()["error"]["message"]

    stack.openai.reset()
    stack.openai.configure(tpm=600)  # 100 tokens per window; each request costs 4 prompt + 90 max_tokens
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        await client.chat.completions.create(model=stack.deployment, messages=ask("four"), max_tokens=90)
        with pytest.raises(openai.RateLimitError) as token_limited:
            await client.chat.completions.create(model=stack.deployment, messages=ask("five"), max_tokens=90)
    assert "exceeded token rate limit" in token_limited.value.response.json()["error"]["message"]


async def test_a_minute_long_token_window_and_stripped_rate_headers(stack: LocalStack) -> None:
    # The public simulator's semantics: tokens over 60 s, remaining-tokens counting them, retry-after only.
    stack.openai.configure(tpm=600, token_window_s=60, retry_after_ms=False)
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        first = await client.chat.completions.with_raw_response.create(
            model=stack.deployment, messages=ask("four"), max_tokens=90
        )
        # What is left of a minute's 600 tokens after one request of ~94 (a 10 s window holds only 100).
        assert 500 <= int(first.headers["x-ratelimit-remaining-tokens"]) < 600 - 90
        for text in ("five", "six", "seven", "eight", "nine"):
            await client.chat.completions.create(model=stack.deployment, messages=ask(text), max_tokens=90)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("ten"), max_tokens=90)
    headers = caught.value.response.headers
    assert "retry-after-ms" not in headers
    assert 10 < int(headers["retry-after"]) <= 60  # until the minute frees: longer than any 10 s window
    stack.openai.reset()
    stack.openai.configure(rpm=6, rate_headers=False)  # behind a gateway that strips x-ratelimit-*
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        answer = await client.chat.completions.with_raw_response.create(
            model=stack.deployment, messages=ask("a")
        )
        with pytest.raises(openai.RateLimitError) as stripped:
            await client.chat.completions.create(model=stack.deployment, messages=ask("b"))
    assert not [name for name in answer.headers if name.startswith("x-ratelimit-")]
    assert not [name for name in stripped.value.response.headers if name.startswith("x-ratelimit-")]
    assert int(stripped.value.response.headers["retry-after"]) >= 1


async def test_content_filter_on_prompt_and_output(stack: LocalStack) -> None:
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("please FILTER_ME"))
        filtered = await client.chat.completions.create(model=stack.deployment, messages=ask("FILTER_OUTPUT"))
    assert caught.value.code == "content_filter"
    error = caught.value.response.json()["error"]
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["hate"] == {"filtered": True, "severity": "high"}
    assert filtered.choices[0].finish_reason == "content_filter"


async def test_api_key_auth_and_wrong_key(stack: LocalStack) -> None:
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        completion = await client.chat.completions.create(model=stack.deployment, messages=ask("key"))
    async with azure_openai(stack, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("key"))
    assert completion.choices[0].message.content == "ECHO: key"
    assert caught.value.code == "401"
    assert caught.value.response.json()["error"]["message"].startswith(
        "Access denied due to invalid subscription"
    )
    stats = stack.openai.stats()
    assert stats["by_auth"] == {"api-key": 1}
    assert stats["by_status"] == {"200": 1, "401": 1}


async def test_unknown_deployment_and_missing_api_version(stack: LocalStack) -> None:
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-5-nonexistent", messages=ask("x"))
    assert caught.value.code == "DeploymentNotFound"
    url = f"{stack.openai_endpoint}/openai/deployments/{stack.deployment}/chat/completions"
    connector = aiohttp.TCPConnector(ssl=stack.ssl_context())
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, json={"messages": ask("x")}, headers={"api-key": stack.openai_api_key}) as response,
    ):
        assert response.status == 404
        assert await response.json() == {"error": {"code": "404", "message": "Resource not found"}}


async def test_embeddings_are_deterministic(stack: LocalStack) -> None:
    async with azure_openai(stack, api_key=stack.openai_api_key) as client:
        default = await client.embeddings.create(model="text-embedding-3-small", input=["cat", "dog"])
        floats = await client.embeddings.create(
            model="text-embedding-3-small", input="cat", encoding_format="float"
        )
    assert default.data[0].embedding == pytest.approx(embedding_vector("cat", 8), abs=1e-6)
    assert floats.data[0].embedding == pytest.approx(default.data[0].embedding, abs=1e-6)
    assert default.data[0].embedding != default.data[1].embedding
    assert stack.openai.stats()["by_operation"] == {"embeddings": 2}


async def test_faults_latency_and_repeats(stack: LocalStack) -> None:
    stack.openai.configure(latency_ms=300)
    async with azure_openai(stack, api_key=stack.openai_api_key, timeout_s=1.0) as client:
        started = time.monotonic()
        await client.chat.completions.create(model=stack.deployment, messages=ask("slow"))
        assert time.monotonic() - started >= 0.3
        await client.chat.completions.create(model=stack.deployment, messages=ask("slow"))
        stack.openai.configure(latency_ms=0, error_rate=1.0)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=stack.deployment, messages=ask("boom"))
        stack.openai.configure(error_rate=0.0, hang_rate=1.0, hang_seconds=3.0)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model=stack.deployment, messages=ask("hang"))
    assert caught.value.status_code in {500, 503}
    stats = stack.openai.stats()
    assert stats["successes"] == 2
    assert stats["repeats"] == 1
    assert stats["completion_tokens"] == 2 * math.ceil(len("ECHO: slow") / 4)
    assert sum(stats["tokens_by_second"].values()) == stats["prompt_tokens"] + stats["completion_tokens"]
    assert stats["first_request_at"] <= stats["last_request_at"]


def test_admin_rejects_unknown_settings(stack: LocalStack) -> None:
    with pytest.raises(AdminError, match="unknown setting 'rmp'"):
        stack.openai.configure(rmp=10)
    with pytest.raises(AdminError, match="must be"):
        stack.openai.configure(tpm="lots")
    assert stack.openai.configure(tpm=6000)["tpm"] == 6000
    assert stack.openai.reset()["tpm"] is None


# ---- Entra authority: service principals, federation, Azure CLI, interactive --------------------------

FRESH_CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"%d"}}}'
"""The claims challenge the worker sends to force a freshly issued token."""


class ThreadedCredential:
    """An async TokenCredential over a sync one (InteractiveBrowserCredential has no async version)."""

    def __init__(self, credential: InteractiveBrowserCredential) -> None:
        self._credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return await asyncio.to_thread(self._credential.get_token, *scopes, **kwargs)

    async def close(self) -> None:
        self._credential.close()

    async def __aenter__(self) -> ThreadedCredential:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


def tls(stack: LocalStack) -> dict[str, Any]:
    """Keyword arguments making an azure-identity credential trust the stack's CA and use its authority."""
    return {"authority": stack.authority_host, "connection_verify": str(stack.ca_file)}


@contextlib.asynccontextmanager
async def blob_service(stack: LocalStack, credential: Any) -> AsyncIterator[BlobServiceClient]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_context())) as session,
        BlobServiceClient(
            stack.account_url,
            credential=credential,
            transport=AioHttpTransport(session=session, session_owner=False),
        ) as service,
    ):
        yield service


async def assert_accepted_everywhere(stack: LocalStack, credential: Any) -> None:
    """The credential's tokens work as bearer tokens at the fake Azure OpenAI and at Azurite."""
    provider = get_bearer_token_provider(credential, OPENAI_SCOPE)
    async with azure_openai(stack, token_provider=provider) as client:
        completion = await client.chat.completions.create(model=stack.deployment, messages=ask("who am I?"))
    assert completion.choices[0].message.content == "ECHO: who am I?"
    assert stack.openai.stats()["by_auth"] == {"bearer": 1}
    container = f"c{uuid.uuid4().hex[:12]}"
    async with blob_service(stack, credential) as service:
        await service.create_container(container)
        await service.get_blob_client(container, "probe.txt").upload_blob(b"ok")
        assert [c.name async for c in service.list_containers(name_starts_with=container)] == [container]


def token_requests(stack: LocalStack) -> set[tuple[str, str, str, int]]:
    return {
        (entry["grant"], entry["kind"], entry["app"], entry["status"])
        for entry in stack.identity.stats()["entra"]["token_requests"]
    }


def google_id_token(stack: LocalStack, audience: str = FEDERATION_AUDIENCE) -> str:
    """What a GCP workload's assertion callback does: ask the metadata server for an ID token."""
    query = urllib.parse.urlencode({"audience": audience, "format": "full"})
    request = urllib.request.Request(
        f"http://{stack.gce_metadata_host}/computeMetadata/v1/instance/service-accounts/default/identity?{query}",
        headers={"Metadata-Flavor": "Google"},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
        return str(response.read().decode())


async def test_client_secret_credential(stack: LocalStack) -> None:
    async with ClientSecretCredential(
        stack.tenant_id, stack.sp_client_id, stack.sp_client_secret, **tls(stack)
    ) as credential:
        token = await credential.get_token(OPENAI_SCOPE)
        await assert_accepted_everywhere(stack, credential)
    claims = claims_of(token.token)
    assert claims["appid"] == stack.sp_client_id
    assert claims["oid"] == stack.app_ids["sp-secret"]["object_id"]
    assert claims["idtyp"] == "app"
    assert abs(token.expires_on - (time.time() + 3599)) < 60
    assert token_requests(stack) == {("client_credentials", "secret", "sp-secret", 200)}
    stats = stack.identity.stats()
    assert stats["by_kind"] == {"entra": 2}  # one token per scope, then the credential's cache
    assert {(e["source"], e["principal"]) for e in stats["issued"]} == {("entra", "sp-secret")}


async def test_wrong_secret_unknown_app_and_unknown_tenant_are_refused(stack: LocalStack) -> None:
    async with ClientSecretCredential(
        stack.tenant_id, stack.sp_client_id, "not-the-secret", **tls(stack)
    ) as bad:
        with pytest.raises(ClientAuthenticationError, match="AADSTS7000215: Invalid client secret provided"):
            await bad.get_token(STORAGE_SCOPE)
    unknown_app = str(uuid.uuid4())
    async with ClientSecretCredential(
        stack.tenant_id, unknown_app, stack.sp_client_secret, **tls(stack)
    ) as bad:
        with pytest.raises(
            ClientAuthenticationError, match=f"AADSTS700016: Application with identifier '{unknown_app}'"
        ):
            await bad.get_token(STORAGE_SCOPE)
    async with ClientSecretCredential(
        str(uuid.uuid4()), stack.sp_client_id, stack.sp_client_secret, **tls(stack)
    ) as bad:
        with pytest.raises(ClientAuthenticationError, match="AADSTS90002: Tenant"):
            await bad.get_token(STORAGE_SCOPE)
    entra = stack.identity.stats()["entra"]
    assert entra["errors"] == {"AADSTS7000215": 1, "AADSTS700016": 1, "AADSTS90002": 1}
    assert ("client_credentials", "secret", "sp-secret", 401) in token_requests(stack)


async def test_error_body_has_entras_shape(stack: LocalStack) -> None:
    url = f"{stack.authority_host}/{stack.tenant_id}/oauth2/v2.0/token"
    form = {
        "grant_type": "client_credentials",
        "client_id": stack.sp_client_id,
        "client_secret": "wrong",
        "scope": STORAGE_SCOPE,
    }
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_context())) as session,
        session.post(url, data=form) as response,
    ):
        body = await response.json()
    assert response.status == 401
    assert set(body) == {
        "error",
        "error_description",
        "error_codes",
        "timestamp",
        "trace_id",
        "correlation_id",
        "error_uri",
    }
    assert body["error"] == "invalid_client"
    assert body["error_codes"] == [7000215]
    assert body["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert (
        f"Trace ID: {body['trace_id']} Correlation ID: {body['correlation_id']}" in body["error_description"]
    )


async def test_certificate_credential(stack: LocalStack, tmp_path: Path) -> None:
    async with CertificateCredential(
        stack.tenant_id, stack.sp_cert_client_id, certificate_path=str(stack.sp_cert_path), **tls(stack)
    ) as credential:
        token = await credential.get_token(STORAGE_SCOPE)
        await assert_accepted_everywhere(stack, credential)
    assert claims_of(token.token)["appid"] == stack.sp_cert_client_id
    key, cert = self_signed_certificate("not-registered")
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + cert
    )
    async with CertificateCredential(
        stack.tenant_id, stack.sp_cert_client_id, certificate_path=str(stranger), **tls(stack)
    ) as bad:
        with pytest.raises(ClientAuthenticationError, match="AADSTS700027: The certificate with identifier"):
            await bad.get_token(STORAGE_SCOPE)
    assert token_requests(stack) == {
        ("client_credentials", "certificate", "sp-cert", 200),
        ("client_credentials", "certificate", "sp-cert", 401),
    }


async def test_workload_identity(stack: LocalStack, tmp_path: Path) -> None:
    projected = claims_of(stack.federated_token_file.read_text())
    assert projected["iss"] == stack.workload_issuer.issuer
    assert projected["iss"].startswith("https://oidc.local-aks.test/")
    assert projected["sub"] == stack.workload_subject == "system:serviceaccount:batch:worker"
    assert projected["aud"] == [FEDERATION_AUDIENCE]
    async with WorkloadIdentityCredential(
        tenant_id=stack.tenant_id,
        client_id=stack.workload_client_id,
        token_file_path=str(stack.federated_token_file),
        **tls(stack),
    ) as credential:
        token = await credential.get_token(OPENAI_SCOPE)
        await assert_accepted_everywhere(stack, credential)
    assert claims_of(token.token)["appid"] == stack.workload_client_id

    for subject, lifetime_s, error in (
        ("system:serviceaccount:batch:intruder", 3600, "AADSTS70021: No matching federated identity record"),
        (stack.workload_subject, -900, "AADSTS700024: Client assertion is not within its valid time range"),
    ):
        token_file = tmp_path / f"token{lifetime_s}"
        stack.write_federated_token(subject=subject, lifetime_s=lifetime_s, path=token_file)
        async with WorkloadIdentityCredential(
            tenant_id=stack.tenant_id,
            client_id=stack.workload_client_id,
            token_file_path=str(token_file),
            **tls(stack),
        ) as bad:
            with pytest.raises(ClientAuthenticationError, match=error):
                await bad.get_token(STORAGE_SCOPE)
    assert token_requests(stack) == {
        ("client_credentials", "federated:kubernetes", "workload-identity", 200),
        ("client_credentials", "federated:kubernetes", "workload-identity", 400),
        ("client_credentials", "federated:kubernetes", "workload-identity", 401),
    }
    rotated = stack.write_federated_token()
    assert stack.federated_token_file.read_text() == rotated
    assert claims_of(rotated)["exp"] >= projected["exp"]


def test_gce_metadata_server(stack: LocalStack) -> None:
    base = f"http://{stack.gce_metadata_host}/computeMetadata/v1/instance/service-accounts/default/identity"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        opener.open(f"{base}?audience=x", timeout=5)
    assert forbidden.value.code == 403
    forbidden.value.close()
    with pytest.raises(urllib.error.HTTPError) as no_audience:
        opener.open(urllib.request.Request(base, headers={"Metadata-Flavor": "Google"}), timeout=5)
    assert no_audience.value.code == 400
    no_audience.value.close()
    claims = claims_of(google_id_token(stack))
    assert claims["iss"] == "https://accounts.google.com"
    assert claims["sub"] == claims["azp"] == stack.gcp_service_account_id
    assert claims["aud"] == FEDERATION_AUDIENCE
    assert claims["email"] == stack.gcp_service_account_email
    assert isinstance(claims["google"], dict)
    assert claims["google"]["compute_engine"]["project_id"] == "local-stack-project"
    stats = stack.identity.stats()["gce_metadata"]
    assert stats["by_endpoint"] == {"identity": {"200": 1, "400": 1, "403": 1}}
    assert stats["audiences"] == {FEDERATION_AUDIENCE: 1}


async def test_gcp_federation_with_client_assertion_credential(stack: LocalStack) -> None:
    async with ClientAssertionCredential(
        stack.tenant_id, stack.gcp_client_id, lambda: google_id_token(stack), **tls(stack)
    ) as credential:
        first = await credential.get_token(OPENAI_SCOPE)
        await assert_accepted_everywhere(stack, credential)
        cached = await credential.get_token(OPENAI_SCOPE)
        forced = await credential.get_token(OPENAI_SCOPE, claims=FRESH_CLAIMS % time.time())
    assert claims_of(first.token)["appid"] == stack.gcp_client_id
    assert cached.token == first.token
    assert (
        claims_of(forced.token)["jti"] != claims_of(first.token)["jti"]
    )  # a claims challenge skips the cache
    stats = stack.identity.stats()
    assert stats["entra"]["claims_requests"] == 1
    assert stats["gce_metadata"]["by_endpoint"] == {"identity": {"200": 3}}  # one ID token per token request

    someone_else = stack.google_issuer.mint("109876543210987654321")
    async with ClientAssertionCredential(
        stack.tenant_id, stack.gcp_client_id, lambda: someone_else, **tls(stack)
    ) as bad:
        with pytest.raises(ClientAuthenticationError, match="AADSTS70021") as caught:
            await bad.get_token(OPENAI_SCOPE)
    assert "Assertion Subject: '109876543210987654321'" in str(caught.value)
    assert token_requests(stack) == {
        ("client_credentials", "federated:google", "gcp-federation", 200),
        ("client_credentials", "federated:google", "gcp-federation", 400),
    }


async def test_azure_cli_credential(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", stack.worker_env("azure-cli")["PATH"])
    async with AzureCliCredential() as credential:
        token = await credential.get_token(OPENAI_SCOPE)
        await assert_accepted_everywhere(stack, credential)
        with pytest.raises(CredentialUnavailableError, match="doesn't support claims challenges"):
            await credential.get_token(OPENAI_SCOPE, claims=FRESH_CLAIMS % time.time())
    claims = claims_of(token.token)
    assert claims["upn"] == stack.user_upn
    assert claims["oid"] == stack.user_object_id
    assert claims["appid"] == AZURE_CLI_CLIENT_ID
    assert claims["idtyp"] == "user"
    assert abs(token.expires_on - (time.time() + 3600)) < 60
    async with AzureCliCredential(tenant_id=str(uuid.uuid4())) as other_tenant:
        with pytest.raises(ClientAuthenticationError, match="AADSTS90002"):
            await other_tenant.get_token(STORAGE_SCOPE)
    stack.az_logout()
    try:
        async with AzureCliCredential() as logged_out:
            with pytest.raises(CredentialUnavailableError, match="az login"):
                await logged_out.get_token(STORAGE_SCOPE)
    finally:
        stack.az_login()
    stats = stack.identity.stats()
    assert stats["by_kind"] == {"az-cli": 4}  # AzureCliCredential has no cache: every get_token runs az
    assert stats["by_status"] == {"200": 3, "400": 1}


async def test_interactive_browser_credential(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER", str(stack.browser))
    # webbrowser reads BROWSER once per process, at its first use: make it read it now.
    monkeypatch.setattr(webbrowser, "_tryorder", None)
    monkeypatch.setattr(webbrowser, "_browsers", {})
    credential = InteractiveBrowserCredential(
        client_id=stack.interactive_client_id,
        tenant_id=stack.tenant_id,
        disable_instance_discovery=True,
        redirect_uri=f"http://localhost:{free_port()}",
        timeout=30,
        **tls(stack),
    )
    async with ThreadedCredential(credential) as threaded:
        token = await threaded.get_token(OPENAI_SCOPE)
        await assert_accepted_everywhere(stack, threaded)
    claims = claims_of(token.token)
    assert claims["upn"] == stack.user_upn
    assert claims["appid"] == stack.interactive_client_id
    assert claims["scp"] == "user_impersonation"
    entra = stack.identity.stats()["entra"]
    assert entra["authorize_requests"] == {
        "200": 1
    }  # one browser sign-in; storage came from the refresh token
    assert token_requests(stack) == {
        ("authorization_code", "authorization_code", "interactive", 200),
        ("refresh_token", "refresh_token", "interactive", 200),
    }


async def test_authorization_code_flow_checks(stack: LocalStack) -> None:
    base = f"{stack.authority_host}/{stack.tenant_id}/oauth2/v2.0"
    verifier = secrets.token_urlsafe(48)
    redirect_uri = "http://localhost:8400"
    authorize = {
        "client_id": stack.interactive_client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": f"{OPENAI_SCOPE} openid profile offline_access",
        "state": "st4te",
        "nonce": "n0nce",
        "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
        "code_challenge_method": "S256",
    }
    redeem = {
        "grant_type": "authorization_code",
        "client_id": stack.interactive_client_id,
        "redirect_uri": redirect_uri,
        "scope": authorize["scope"],
    }

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_context())) as session:

        async def get_code(**changes: str) -> tuple[int, dict[str, list[str]], str]:
            async with session.get(
                f"{base}/authorize", params={**authorize, **changes}, allow_redirects=False
            ) as r:
                location = urllib.parse.urlsplit(r.headers.get("Location", ""))
                return r.status, urllib.parse.parse_qs(location.query), await r.text()

        async def redeem_code(**fields: str) -> tuple[int, dict[str, Any]]:
            async with session.post(f"{base}/token", data={**redeem, **fields}) as response:
                return response.status, await response.json()

        status, query, _ = await get_code()
        assert status == 302
        assert query["state"] == ["st4te"]
        status, wrong_verifier = await redeem_code(code=query["code"][0], code_verifier="not-the-verifier")
        assert (status, wrong_verifier["error_codes"]) == (400, [501481])

        _, query, _ = await get_code()
        status, tokens = await redeem_code(code=query["code"][0], code_verifier=verifier)
        assert status == 200
        assert {"access_token", "refresh_token", "id_token", "client_info", "expires_in", "scope"} <= set(
            tokens
        )
        id_token = claims_of(tokens["id_token"])
        assert (id_token["nonce"], id_token["aud"]) == ("n0nce", stack.interactive_client_id)
        assert id_token["preferred_username"] == stack.user_upn
        status, reused = await redeem_code(code=query["code"][0], code_verifier=verifier)
        assert (status, reused["error_codes"]) == (400, [54005])

        status, _, page = await get_code(redirect_uri="https://evil.test/callback")
        assert status == 400
        assert "AADSTS50011" in page
        status, _, page = await get_code(client_id=str(uuid.uuid4()))
        assert status == 400
        assert "AADSTS700016" in page
        status, query, _ = await get_code(code_challenge_method="plain")
        assert status == 302
        assert query["error"] == ["invalid_request"]


async def test_discovery_documents(stack: LocalStack) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=stack.ssl_context())) as session:
        async with session.get(
            f"{stack.authority_host}/{stack.tenant_id}/v2.0/.well-known/openid-configuration"
        ) as r:
            config = await r.json()
        async with session.get(
            f"{stack.authority_host}/common/discovery/instance",
            params={"api-version": "1.1", "authorization_endpoint": config["authorization_endpoint"]},
        ) as r:
            instance = await r.json()
        async with session.get(config["jwks_uri"]) as r:
            keys = await r.json()
        async with session.get(
            f"{stack.authority_host}/{uuid.uuid4()}/v2.0/.well-known/openid-configuration"
        ) as r:
            unknown_tenant = (r.status, await r.json())
    assert config["issuer"] == f"{stack.authority_host}/{stack.tenant_id}/v2.0"
    assert config["token_endpoint"] == f"{stack.authority_host}/{stack.tenant_id}/oauth2/v2.0/token"
    assert (
        config["authorization_endpoint"] == f"{stack.authority_host}/{stack.tenant_id}/oauth2/v2.0/authorize"
    )
    assert (
        instance["tenant_discovery_endpoint"]
        == f"{stack.authority_host}/{stack.tenant_id}/v2.0/.well-known/openid-configuration"
    )
    assert [key["kid"] for key in keys["keys"]] == [stack.mint.kid]
    assert unknown_tenant[0] == 400
    assert unknown_tenant[1]["error_codes"] == [90002]


async def test_authority_outage_knob(stack: LocalStack) -> None:
    stack.identity.configure(authority_fail_next=1)
    async with ClientSecretCredential(
        stack.tenant_id, stack.sp_client_id, stack.sp_client_secret, retry_backoff_factor=0.01, **tls(stack)
    ) as credential:
        await credential.get_token(STORAGE_SCOPE)  # azure-identity retries the 503 itself
    assert token_requests(stack) == {
        ("client_credentials", "-", "unknown", 503),
        ("client_credentials", "secret", "sp-secret", 200),
    }


# ---- worker environments -----------------------------------------------------------------------------


def test_worker_env(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    for leak in ("AZURE_OPENAI_AD_TOKEN", "OPENAI_API_KEY", "MSI_SECRET", "BROWSER", "GCE_METADATA_HOST"):
        monkeypatch.setenv(leak, "leak")
    env = stack.worker_env()
    for leak in ("AZURE_OPENAI_AD_TOKEN", "OPENAI_API_KEY", "MSI_SECRET", "BROWSER", "GCE_METADATA_HOST"):
        assert leak not in env
    assert env["AZURE_CLIENT_ID"] == stack.user_assigned_client_id
    assert env["IDENTITY_ENDPOINT"] == stack.identity_endpoint
    assert env["SSL_CERT_FILE"] == str(stack.ca_file) == env["REQUESTS_CA_BUNDLE"]
    assert env["AZURE_OPENAI_ENDPOINT"] == stack.openai_endpoint
    assert env["OPENAI_API_VERSION"] == "2024-10-21"
    assert env["WORKER_AUTH"] == "managed-identity"
    assert Path(env["SSL_CERT_FILE"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    api_key_env = stack.worker_env("api-key")
    assert api_key_env["AZURE_OPENAI_API_KEY"] == stack.openai_api_key
    # Storage still authenticates with Entra (DefaultAzureCredential -> the managed identity).
    assert api_key_env["IDENTITY_ENDPOINT"] == stack.identity_endpoint
    assert api_key_env["AZURE_CLIENT_ID"] == stack.user_assigned_client_id

    authority = {"AZURE_TENANT_ID": stack.tenant_id, "AZURE_AUTHORITY_HOST": stack.authority_host}
    expected = {
        "service-principal": {
            **authority,
            "AZURE_CLIENT_ID": stack.sp_client_id,
            "AZURE_CLIENT_SECRET": stack.sp_client_secret,
            "WORKER_AUTH": "service-principal",
        },
        "service-principal-cert": {
            **authority,
            "AZURE_CLIENT_ID": stack.sp_cert_client_id,
            "AZURE_CLIENT_CERTIFICATE_PATH": str(stack.sp_cert_path),
            "WORKER_AUTH": "service-principal",
        },
        "workload-identity": {
            **authority,
            "AZURE_CLIENT_ID": stack.workload_client_id,
            "AZURE_FEDERATED_TOKEN_FILE": str(stack.federated_token_file),
            "WORKER_AUTH": "workload-identity",
        },
        "gcp-federation": {
            **authority,
            "AZURE_CLIENT_ID": stack.gcp_client_id,
            "GCE_METADATA_HOST": stack.gce_metadata_host,
            "WORKER_AUTH": "gcp-federation",
        },
        "interactive": {
            **authority,
            "AZURE_CLIENT_ID": stack.interactive_client_id,
            "BROWSER": str(stack.browser),
            "WORKER_AUTH": "interactive",
        },
        "auto-sp": {
            **authority,
            "AZURE_CLIENT_ID": stack.sp_client_id,
            "AZURE_CLIENT_SECRET": stack.sp_client_secret,
            "WORKER_AUTH": "auto",
        },
        "azure-cli": {"WORKER_AUTH": "azure-cli"},
    }
    for mode, variables in expected.items():
        mode_env = stack.worker_env(mode)
        assert variables.items() <= mode_env.items(), mode
        assert mode_env["SSL_CERT_FILE"] == str(stack.ca_file), mode
        assert "IDENTITY_ENDPOINT" not in mode_env, mode
    assert stack.worker_env("azure-cli")["PATH"].startswith(f"{stack.az_bin_dir}{os.pathsep}")
    assert stack.sp_cert_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(ValueError, match="unknown auth mode"):
        stack.worker_env("kerberos")


# The worker's own credential for its settings, in a process configured by nothing but the environment
# (SSL_CERT_FILE must be set before aiohttp is imported, as it is for the worker itself).
BUILD_CREDENTIAL = """
import asyncio, os
from worker.identity import STORAGE_SCOPE, build_credential
from worker.settings import load_settings

async def main() -> str:
    async with build_credential(load_settings({}, os.environ)) as credential:
        return (await credential.get_token(STORAGE_SCOPE)).token

print(asyncio.run(main()))
"""


@pytest.mark.parametrize(
    ("mode", "app"),
    [
        ("managed-identity", None),
        ("service-principal", "sp-secret"),
        ("service-principal-cert", "sp-cert"),
        ("workload-identity", "workload-identity"),
        ("auto-sp", "sp-secret"),
        ("api-key", None),
    ],
)
def test_worker_env_modes_authenticate(stack: LocalStack, mode: str, app: str | None) -> None:
    """Each mode's variables alone configure the credential `worker.identity.build_credential` builds."""
    done = subprocess.run(
        [sys.executable, "-c", BUILD_CREDENTIAL],
        env=stack.worker_env(mode),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    expected_client = stack.app_ids[app]["client_id"] if app else stack.user_assigned_client_id
    assert claims_of(done.stdout.strip())["appid"] == expected_client
