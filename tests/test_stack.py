"""The local Azure stack speaks the real protocols: the real SDKs run against it over HTTPS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import jwt
import openai
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential, get_bearer_token_provider
from azure.storage.blob.aio import BlobServiceClient
from openai.types.chat import ChatCompletionMessageParam

from tests.stack import LocalStack
from tests.stack.admin import AdminError
from tests.stack.openai_bodies import embedding_vector

pytestmark = pytest.mark.stack

STORAGE_SCOPE = "https://storage.azure.com/.default"
OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"
ENTRA_401_BODY = {
    "statusCode": 401,
    "message": "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired.",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_fakes(stack: LocalStack) -> None:
    stack.openai.reset()
    stack.identity.reset()


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


def test_worker_env(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_AD_TOKEN", "leak")
    monkeypatch.setenv("OPENAI_API_KEY", "leak")
    monkeypatch.setenv("MSI_SECRET", "leak")
    env = stack.worker_env()
    assert "AZURE_OPENAI_AD_TOKEN" not in env
    assert "OPENAI_API_KEY" not in env
    assert "MSI_SECRET" not in env
    assert env["AZURE_CLIENT_ID"] == stack.user_assigned_client_id
    assert env["IDENTITY_ENDPOINT"] == stack.identity_endpoint
    assert env["SSL_CERT_FILE"] == str(stack.ca_file) == env["REQUESTS_CA_BUNDLE"]
    assert env["AZURE_OPENAI_ENDPOINT"] == stack.openai_endpoint
    assert env["OPENAI_API_VERSION"] == "2024-10-21"
    assert env["WORKER_AUTH"] == "managed-identity"
    assert Path(env["SSL_CERT_FILE"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    api_key_env = stack.worker_env("api-key")
    assert api_key_env["AZURE_OPENAI_API_KEY"] == stack.openai_api_key
    assert "IDENTITY_ENDPOINT" not in api_key_env
    with pytest.raises(ValueError, match="unknown auth mode"):
        stack.worker_env("kerberos")
