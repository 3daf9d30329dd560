"""Every client of a run, opened once in one AsyncExitStack and closed in reverse order.

One SSL context (honouring SSL_CERT_FILE), one aiohttp session for Blob Storage, one credential behind one
`SharedTokens` cache for both Blob Storage and Azure OpenAI, one `AsyncAzureOpenAI` on aiohttp per Azure
OpenAI endpoint (a pool's deployments may be in several regions).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import structlog
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry
from openai import AsyncAzureOpenAI

from worker.errors import ConfigError
from worker.identity import OPENAI_SCOPE, SharedTokens, build_credential
from worker.settings import Settings
from worker.storage import Sink, Source
from worker.storage.blob import BlobSink, BlobSource
from worker.storage.local import LocalSink, LocalSource
from worker.storage.urls import BlobLocation, LocalLocation, Location

log = structlog.get_logger("worker.services")


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The system's trust store, or SSL_CERT_FILE when set (a private CA, the local test stack)."""
    return ssl.create_default_context(cafile=settings.ssl_cert_file)


def ignored_variables(settings: Settings) -> dict[str, str]:
    """The variables that are set but that the worker ignores, each with why: the OpenAI SDK would silently
    prefer them over the chosen mode."""
    ignored: dict[str, str] = {}
    if settings.azure_openai_ad_token is not None:
        reason = "a static token would expire mid-run; the worker uses its own credential. Unset it."
        ignored["AZURE_OPENAI_AD_TOKEN"] = reason
    if settings.auth != "api-key" and settings.api_key is not None:
        ignored["AZURE_OPENAI_API_KEY"] = (
            f"--auth is {settings.auth}; the key is used only with --auth api-key"
        )
    return ignored


def warn_about_ignored_secrets(settings: Settings) -> None:
    """One warning per variable the worker ignores (see `ignored_variables`)."""
    for variable, reason in ignored_variables(settings).items():
        log.warning("config.ignored_variable", variable=variable, reason=reason)


class Clients:
    """The clients of one process, created on first use and closed together.

    One SSL context, one aiohttp session for Blob Storage, one `SharedTokens` over one credential,
    one BlobServiceClient per storage account, one AsyncAzureOpenAI per Azure OpenAI endpoint.
    """

    def __init__(self, settings: Settings, stack: contextlib.AsyncExitStack) -> None:
        self._settings = settings
        self._stack = stack
        self._context = ssl_context(settings)
        self._tokens: SharedTokens | None = None
        self._session: aiohttp.ClientSession | None = None
        self._blob_services: dict[str, BlobServiceClient] = {}
        self._openai: dict[str, AsyncAzureOpenAI] = {}

    @property
    def tokens(self) -> SharedTokens:
        """The shared token cache over the mode's credential (created on first use)."""
        if self._tokens is None:
            self._tokens = SharedTokens(build_credential(self._settings))
            self._stack.push_async_callback(self._tokens.close)
        return self._tokens

    @property
    def uses_entra_for_openai(self) -> bool:
        return self._settings.auth != "api-key"

    def blob_service(self, location: BlobLocation) -> BlobServiceClient:
        """One client per storage account, on the shared session; Entra ID unless a connection string is set."""
        client = self._blob_services.get(location.account_url)
        if client is not None:
            return client
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._context, limit=max(64, self._settings.concurrency * 2))
            self._session = aiohttp.ClientSession(connector=connector)
            self._stack.push_async_callback(self._session.close)
        options: dict[str, Any] = {
            "transport": AioHttpTransport(session=self._session, session_owner=False),
            "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=6),
        }
        connection_string = self._settings.storage_connection_string
        if connection_string is not None:
            client = BlobServiceClient.from_connection_string(connection_string.get_secret_value(), **options)
        else:
            client = BlobServiceClient(location.account_url, credential=self.tokens, **options)
        self._blob_services[location.account_url] = client
        self._stack.push_async_callback(client.close)
        return client

    def source(self, location: Location) -> Source:
        if isinstance(location, LocalLocation):
            return LocalSource(location.path)
        container = self.blob_service(location).get_container_client(location.container)
        return BlobSource(container, location.prefix, str(location))

    def sink(self, location: Location) -> Sink:
        if isinstance(location, LocalLocation):
            return LocalSink(location.path)
        container = self.blob_service(location).get_container_client(location.container)
        return BlobSink(container, location.prefix, str(location), lease_seconds=self._settings.lease_seconds)

    @property
    def openai(self) -> openai.AsyncAzureOpenAI:
        """The client of AZURE_OPENAI_ENDPOINT."""
        return self.openai_for(None)

    def openai_for(self, endpoint: str | None) -> AsyncAzureOpenAI:
        """One AsyncAzureOpenAI per endpoint (None: AZURE_OPENAI_ENDPOINT), all on the one token cache."""
        endpoint = endpoint or self._settings.endpoint
        client = self._openai.get(endpoint or "")
        if client is None:
            tokens = self.tokens if self.uses_entra_for_openai else None
            client = self._openai[endpoint or ""] = openai_client(
                self._settings, tokens, self._context, endpoint
            )
            self._stack.push_async_callback(client.close)
        return client


@contextlib.asynccontextmanager
async def open_clients(settings: Settings) -> AsyncIterator[Clients]:
    """Clients for a run or a doctor check; everything opened is closed when the block ends."""
    warn_about_ignored_secrets(settings)
    async with contextlib.AsyncExitStack() as stack:
        yield Clients(settings, stack)


def openai_client(
    settings: Settings, tokens: SharedTokens | None, context: ssl.SSLContext, endpoint: str | None = None
) -> openai.AsyncAzureOpenAI:
    """AsyncAzureOpenAI on aiohttp for `endpoint` (default AZURE_OPENAI_ENDPOINT), SDK retries off (the
    worker retries), keyed or keyless."""
    endpoint = endpoint or settings.endpoint
    if endpoint is None:
        raise ConfigError("missing setting: AZURE_OPENAI_ENDPOINT (https://RESOURCE.openai.azure.com)")
    limits = httpx2.Limits(
        max_connections=settings.concurrency + 8, max_keepalive_connections=settings.concurrency + 8
    )
    http_client = openai.DefaultAioHttpClient(verify=context, limits=limits)
    if settings.auth == "api-key":
        if settings.api_key is None:
            raise ConfigError("--auth api-key needs AZURE_OPENAI_API_KEY in the environment")
        return openai.AsyncAzureOpenAI(
            azure_endpoint=endpoint,
            api_version=settings.api_version,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,
            timeout=settings.request_timeout,
            http_client=http_client,
        )
    assert tokens is not None
    return openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint,
        api_version=settings.api_version,
        azure_ad_token_provider=tokens.provider(OPENAI_SCOPE),
        max_retries=0,
        timeout=settings.request_timeout,
        http_client=http_client,
    )
