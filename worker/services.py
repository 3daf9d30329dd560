"""Every client of a run, opened once in one AsyncExitStack and closed in reverse order.

One SSL context (honouring SSL_CERT_FILE), one aiohttp session for Blob Storage, one credential behind one
`SharedTokens` cache for both Blob Storage and Azure OpenAI, one `AsyncAzureOpenAI` on aiohttp.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
import httpx2
import openai
import structlog
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob.aio import BlobServiceClient, ExponentialRetry

from worker.errors import ConfigError
from worker.identity import OPENAI_SCOPE, SharedTokens, build_credential
from worker.settings import Settings
from worker.storage import Sink, Source
from worker.storage.blob import BlobSink, BlobSource
from worker.storage.local import LocalSink, LocalSource
from worker.storage.urls import BlobLocation, LocalLocation, Location

log = structlog.get_logger("worker.services")


@dataclass(frozen=True, kw_only=True)
class Services:
    source: Source
    sink: Sink
    openai: openai.AsyncAzureOpenAI
    tokens: SharedTokens | None


def ssl_context() -> ssl.SSLContext:
    """The system's trust store, or SSL_CERT_FILE when set (a private CA, the local test stack)."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)


def warn_about_ignored_secrets(settings: Settings, environ: Mapping[str, str]) -> None:
    """Variables the OpenAI SDK would silently prefer must not override the chosen mode."""
    if environ.get("AZURE_OPENAI_AD_TOKEN"):
        log.warning(
            "config.ignored_variable",
            variable="AZURE_OPENAI_AD_TOKEN",
            reason="a static token would expire mid-run; the worker uses its own credential. Unset it.",
        )
    if settings.auth != "api-key" and environ.get("AZURE_OPENAI_API_KEY"):
        log.warning(
            "config.ignored_variable",
            variable="AZURE_OPENAI_API_KEY",
            reason=f"--auth is {settings.auth}; the key is used only with --auth api-key",
        )


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, source_at: Location, sink_at: Location, environ: Mapping[str, str] | None = None
) -> AsyncIterator[Services]:
    """Open the clients a run needs; everything is closed when the block ends."""
    environ = os.environ if environ is None else environ
    warn_about_ignored_secrets(settings, environ)
    context = ssl_context()
    async with contextlib.AsyncExitStack() as stack:
        uses_blob = isinstance(source_at, BlobLocation) or isinstance(sink_at, BlobLocation)
        needs_entra = settings.auth != "api-key" or (uses_blob and settings.storage_connection_string is None)
        tokens: SharedTokens | None = None
        if needs_entra:
            tokens = SharedTokens(build_credential(settings, environ))
            stack.push_async_callback(tokens.close)

        blob_services: dict[str, BlobServiceClient] = {}
        if uses_blob:
            connector = aiohttp.TCPConnector(ssl=context, limit=max(64, settings.concurrency * 2))
            session = aiohttp.ClientSession(connector=connector)
            stack.push_async_callback(session.close)

        def blob_service(location: BlobLocation) -> BlobServiceClient:
            client = blob_services.get(location.account_url)
            if client is None:
                options = {
                    "transport": AioHttpTransport(session=session, session_owner=False),
                    "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=6),
                }
                if settings.storage_connection_string is not None:
                    client = BlobServiceClient.from_connection_string(
                        settings.storage_connection_string.get_secret_value(), **options
                    )
                else:
                    client = BlobServiceClient(location.account_url, credential=tokens, **options)
                blob_services[location.account_url] = client
                stack.push_async_callback(client.close)
            return client

        source: Source
        if isinstance(source_at, LocalLocation):
            source = LocalSource(source_at.path)
        else:
            container = blob_service(source_at).get_container_client(source_at.container)
            source = BlobSource(container, source_at.prefix, str(source_at))
        sink: Sink
        if isinstance(sink_at, LocalLocation):
            sink = LocalSink(sink_at.path)
        else:
            container = blob_service(sink_at).get_container_client(sink_at.container)
            sink = BlobSink(container, sink_at.prefix, str(sink_at))

        client = openai_client(settings, tokens, context)
        stack.push_async_callback(client.close)
        yield Services(source=source, sink=sink, openai=client, tokens=tokens)


def openai_client(
    settings: Settings, tokens: SharedTokens | None, context: ssl.SSLContext
) -> openai.AsyncAzureOpenAI:
    """AsyncAzureOpenAI on aiohttp, SDK retries off (the worker retries), keyed or keyless."""
    if settings.endpoint is None:
        raise ConfigError("missing setting: AZURE_OPENAI_ENDPOINT (https://RESOURCE.openai.azure.com)")
    http_client = openai.DefaultAioHttpClient(
        verify=context,
        limits=httpx2.Limits(
            max_connections=settings.concurrency + 8, max_keepalive_connections=settings.concurrency + 8
        ),
    )
    limits = httpx2.Limits(
        max_connections=settings.concurrency + 8, max_keepalive_connections=settings.concurrency + 8
    )
    http_client = openai.DefaultAioHttpClient(verify=context, limits=limits)
    if settings.auth == "api-key":
        if settings.api_key is None:
            raise ConfigError("--auth api-key needs AZURE_OPENAI_API_KEY in the environment")
        return openai.AsyncAzureOpenAI(
            azure_endpoint=settings.endpoint,
            api_version=settings.api_version,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,
            timeout=settings.request_timeout,
            http_client=http_client,
        )
    assert tokens is not None
    return openai.AsyncAzureOpenAI(
        azure_endpoint=settings.endpoint,
        api_version=settings.api_version,
        azure_ad_token_provider=tokens.provider(OPENAI_SCOPE),
        max_retries=0,
        timeout=settings.request_timeout,
        http_client=http_client,
    )
