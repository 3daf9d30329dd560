"""One credential per --auth mode, and one shared token cache in front of it.

`SharedTokens` is what every client authenticates through:
- Azure OpenAI gets `tokens.provider(OPENAI_SCOPE)` as its `azure_ad_token_provider`;
- Blob Storage gets `tokens` itself as its (async) TokenCredential.
Concurrent callers share one token fetch per scope (single flight), so thousands of requests cost a
handful of token requests. The stock `get_bearer_token_provider` cannot be told that the service rejected
its cached token; `SharedTokens.refresh(scope, rejected)` can: the next caller gets a freshly issued
token (the credential's own cache is bypassed with a claims challenge), fetched once for all waiters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError
from azure.identity import CredentialUnavailableError

from worker.errors import ConfigError, first_line
from worker.settings import OPTIONS_BY_NAME, Settings

log = structlog.get_logger("worker.identity")

OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"
STORAGE_SCOPE = "https://storage.azure.com/.default"
REFRESH_MARGIN_SECONDS = 300
REFRESH_RETRY_SECONDS = 10.0
# A claims challenge asking for a token issued from now on: credentials skip their caches for it.
_FRESH_CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"%d"}}}'


def build_credential(settings: Settings) -> AsyncTokenCredential:
    """The azure-identity credential for `settings.auth`, from the identity settings (AZURE_CLIENT_ID, ...);
    one the mode needs and lacks → ConfigError naming its environment variable.

    The credentials still read their own platform's variables themselves (IDENTITY_ENDPOINT for a managed
    identity, the chain of DefaultAzureCredential, AZURE_AUTHORITY_HOST for the authority).
    """
    from azure.identity import aio

    mode = settings.auth
    tenant, client_id = settings.azure_tenant_id, settings.azure_client_id

    def need(*names: str) -> None:
        missing = [OPTIONS_BY_NAME[name].env[0] for name in names if not getattr(settings, name)]
        if missing:
            raise ConfigError(f"--auth {mode} needs {', '.join(missing)} in the environment")

    if mode in ("auto", "api-key"):
        return aio.DefaultAzureCredential()
    if mode == "managed-identity":
        return aio.ManagedIdentityCredential(client_id=client_id)
    if mode == "service-principal":
        need("azure_tenant_id", "azure_client_id")
        assert tenant and client_id
        if settings.azure_client_secret:
            return aio.ClientSecretCredential(
                tenant, client_id, settings.azure_client_secret.get_secret_value()
            )
        if settings.azure_client_certificate_path:
            password = settings.azure_client_certificate_password
            return aio.CertificateCredential(
                tenant,
                client_id,
                settings.azure_client_certificate_path,
                password=password.get_secret_value() if password else None,
            )
        raise ConfigError(
            "--auth service-principal needs AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH in the environment"
        )
    if mode == "workload-identity":
        need("azure_tenant_id", "azure_client_id", "azure_federated_token_file")
        return aio.WorkloadIdentityCredential(
            tenant_id=tenant, client_id=client_id, token_file_path=settings.azure_federated_token_file
        )
    if mode == "azure-cli":
        return aio.AzureCliCredential()
    if mode == "gcp-federation":
        need("azure_tenant_id", "azure_client_id")
        assert tenant and client_id
        google = GoogleIdToken(settings.gce_metadata_host or GOOGLE_METADATA_HOST)
        return aio.ClientAssertionCredential(tenant, client_id, google)
    if mode == "interactive":
        from azure.identity import InteractiveBrowserCredential

        options: dict[str, Any] = {"disable_instance_discovery": bool(settings.azure_authority_host)}
        if tenant:
            options["tenant_id"] = tenant
        if client_id:
            options["client_id"] = client_id
        return SyncCredentialInThread(InteractiveBrowserCredential(**options))
    raise ConfigError(f"--auth {mode} is not a known mode")


GOOGLE_METADATA_HOST = "metadata.google.internal"
FEDERATION_AUDIENCE = "api://AzureADTokenExchange"


class GoogleIdToken:
    """Google → Entra federation (--auth gcp-federation): a Google ID token for
    `api://AzureADTokenExchange`, from the metadata server of Cloud Run / GCE / GKE, used as the client
    assertion. Cached until 5 minutes before it expires (Google tokens live an hour), then fetched again.
    """

    def __init__(self, metadata_host: str) -> None:
        self._url = (
            f"http://{metadata_host}/computeMetadata/v1/instance/service-accounts/default/identity"
            f"?audience={FEDERATION_AUDIENCE}&format=full"
        )
        self._token: str | None = None
        self._expires = 0.0

    def __call__(self) -> str:
        if self._token is not None and time.time() < self._expires - REFRESH_MARGIN_SECONDS:
            return self._token
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self._url, headers={"Metadata-Flavor": "Google"})  # noqa: S310 - fixed http URL
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                token: str = response.read().decode().strip()
        except (urllib.error.URLError, OSError) as exc:
            raise ClientAuthenticationError(
                f"could not get a Google ID token from the metadata server ({exc}): gcp-federation runs on "
                "Cloud Run, GCE or GKE, or with GCE_METADATA_HOST pointing at a metadata server"
            ) from None
        self._token = token
        self._expires = float(token_claims(token).get("exp", time.time() + 600))
        return token


class SyncCredentialInThread(AsyncTokenCredential):
    """An async face for a credential that only exists in sync form (InteractiveBrowserCredential)."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        token: AccessToken = await asyncio.to_thread(
            self._credential.get_token, *scopes, claims=claims, tenant_id=tenant_id
        )
        return token

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        return await asyncio.to_thread(self._credential.get_token_info, *scopes, options=options)

    async def close(self) -> None:
        await asyncio.to_thread(self._credential.close)

    async def __aexit__(self, *args: object) -> None:
        await self.close()


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: for naming the principal in messages, never for trust."""
    try:
        payload = token.split(".")[1]
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return decoded if isinstance(decoded, dict) else {}


def describe_principal(token: str) -> str:
    """`object id X (app Y) in tenant Z`, from a token's claims."""
    claims = token_claims(token)
    parts = [f"object id {claims.get('oid', '?')}"]
    if claims.get("appid") or claims.get("azp"):
        parts.append(f"(app {claims.get('appid') or claims.get('azp')})")
    if claims.get("upn") or claims.get("preferred_username"):
        parts.append(f"user {claims.get('upn') or claims.get('preferred_username')}")
    parts.append(f"in tenant {claims.get('tid', '?')}")
    return " ".join(parts)


@dataclass
class _Slot:
    token: AccessTokenInfo | None = None
    lock: asyncio.Lock | None = None
    generation: int = 0  # fetches finished so far; a waiter that saw one fail shares its outcome
    failure: BaseException | None = None
    retry_refresh_at: float = 0.0


class TokenEndpointUnavailable(ServiceRequestError):
    """The token endpoint did not answer, or answered 429/5xx. A ServiceRequestError, so that the layer
    that retries (the call loop, storage's retry policy) retries it like any connection error."""


_TRANSIENT = re.compile(
    r"timed out|timeout|Server disconnected|Connection (refused|reset|aborted)|Cannot connect|"
    r"connection error|ServiceRequestError|ServiceResponseError|temporarily|Too Many Requests|"
    r"Service Unavailable|Internal Server Error|Bad Gateway|Gateway Timeout|\b(429|50\d)\b|"
    r"unexpected error occurred while fetching",
    re.IGNORECASE,
)


def is_transient(exc: ClientAuthenticationError) -> bool:
    """Whether a credential failure is the token endpoint's trouble (unreachable, 429, 5xx) rather than
    a definitive rejection (wrong secret, unknown client id, nothing configured).

    DefaultAzureCredential wraps its credentials' failures into one message without a status: there the
    lines of the credentials that were tried (not merely "unavailable") decide, and only a line that
    shows a transient cause (a connection error, a 429 or 5xx) makes the failure transient.
    """
    if isinstance(exc, CredentialUnavailableError):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    message = exc.message or str(exc)
    attempted = [
        line
        for line in message.splitlines()
        if line.startswith("\t") and "authentication unavailable" not in line and ":" in line
    ]
    return any(_TRANSIENT.search(line) for line in attempted)


class SharedTokens(AsyncTokenCredential):
    """A token cache with single-flight fetches and forced refresh, over one credential.

    - One fetch per scope at a time; callers that waited for a fetch that failed get the same failure.
    - A token due for refresh that cannot be refreshed keeps being served while it is valid; the refresh
      is tried again `REFRESH_RETRY_SECONDS` later.
    - A transient failure (token endpoint unreachable, 429, 5xx) raises TokenEndpointUnavailable, which
      the callers' own retry layers retry; a definitive one raises ConfigError (exit 2).

    `refreshes` (tokens fetched anew because a service refused the cached one) is the run's `token_refreshes`.
    """

    def __init__(self, credential: AsyncTokenCredential) -> None:
        self._credential = credential
        self._slots: dict[str, _Slot] = {}
        self.refreshes = 0

    @property
    def credential(self) -> AsyncTokenCredential:
        return self._credential

    def _slot(self, scope: str) -> _Slot:
        slot = self._slots.get(scope)
        if slot is None:
            slot = self._slots[scope] = _Slot(lock=asyncio.Lock())
        return slot

    @staticmethod
    def _valid(token: AccessTokenInfo | None) -> bool:
        return token is not None and time.time() < token.expires_on - 30

    @staticmethod
    def _fresh_enough(token: AccessTokenInfo | None, slot: _Slot) -> bool:
        if token is None:
            return False
        now = time.time()
        refresh_at = token.refresh_on or token.expires_on - REFRESH_MARGIN_SECONDS
        return now < token.expires_on - 30 and (now < refresh_at or now < slot.retry_refresh_at)

    async def token(self, scope: str) -> AccessTokenInfo:
        """A valid token for `scope`, from cache or one shared fetch."""
        slot = self._slot(scope)
        if self._fresh_enough(slot.token, slot):
            assert slot.token is not None
            return slot.token
        assert slot.lock is not None
        seen = slot.generation
        async with slot.lock:
            if self._fresh_enough(slot.token, slot):
                assert slot.token is not None
                return slot.token
            if slot.generation != seen and slot.failure is not None:
                raise slot.failure  # the fetch this caller waited for failed: share its outcome
            try:
                fetched = await self._fetch(scope, slot, fresh=False)
                if slot.token is not None and fetched.token == slot.token.token:
                    # The credential kept its cached token (it throttles its own refreshes): ask later.
                    slot.retry_refresh_at = time.time() + REFRESH_RETRY_SECONDS
                slot.token = fetched
            except (ConfigError, TokenEndpointUnavailable) as exc:
                if not self._valid(slot.token):
                    raise
                slot.retry_refresh_at = time.time() + REFRESH_RETRY_SECONDS
                log.warning(
                    "identity.refresh_failed",
                    scope=scope,
                    error=first_line(str(exc)),
                    serving_cached_for_s=round(slot.token.expires_on - time.time()) if slot.token else 0,
                    retry_in_s=REFRESH_RETRY_SECONDS,
                )
            assert slot.token is not None
            return slot.token

    async def refresh(self, scope: str, rejected: str) -> bool:
        """The service rejected `rejected`: make the next caller get a newly issued token.

        Returns False when the credential handed back the same token again (nothing more to try).
        Concurrent callers that report the same rejected token share one refresh.
        """
        slot = self._slot(scope)
        assert slot.lock is not None
        async with slot.lock:
            if slot.token is not None and slot.token.token != rejected:
                return True
            fresh = await self._fetch(scope, slot, fresh=True)
            slot.token = fresh
            self.refreshes += 1
            renewed = fresh.token != rejected
            log.warning(
                "identity.token_refreshed",
                scope=scope,
                reason="rejected by the service",
                new_token=renewed,
            )
            return renewed

    async def _fetch(self, scope: str, slot: _Slot, *, fresh: bool) -> AccessTokenInfo:
        """One token request; its outcome is recorded in the slot for the callers that waited."""
        slot.failure = None
        try:
            return await self._fetch_once(scope, fresh=fresh)
        except (ConfigError, TokenEndpointUnavailable) as exc:
            slot.failure = exc
            raise
        finally:
            slot.generation += 1

    async def _fetch_once(self, scope: str, *, fresh: bool) -> AccessTokenInfo:
        try:
            if fresh:
                options: TokenRequestOptions = {"claims": _FRESH_CLAIMS % int(time.time())}
                try:
                    return await self._credential.get_token_info(scope, options=options)  # type: ignore[attr-defined,no-any-return]
                except (ClientAuthenticationError, ValueError):
                    pass  # some credentials (az CLI) refuse claims; they do not cache either
            return await self._credential.get_token_info(scope)  # type: ignore[attr-defined,no-any-return]
        except (ServiceRequestError, ServiceResponseError) as exc:
            log.warning("identity.token_endpoint_unreachable", scope=scope, error=type(exc).__name__)
            raise TokenEndpointUnavailable(
                f"the token endpoint is unreachable ({type(exc).__name__})"
            ) from None
        except ClientAuthenticationError as exc:
            if is_transient(exc):
                log.warning("identity.token_endpoint_unreachable", scope=scope, error=first_line(exc.message))
                raise TokenEndpointUnavailable(
                    f"the token endpoint failed: {first_line(exc.message)}"
                ) from None
            raise ConfigError(f"could not get a token for {scope}: {first_line(exc.message)}") from None

    def provider(self, scope: str) -> Callable[[], Awaitable[str]]:
        """An async bearer-token provider for `openai.AsyncAzureOpenAI(azure_ad_token_provider=...)`."""

        async def bearer() -> str:
            return (await self.token(scope)).token

        return bearer

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """AsyncTokenCredential protocol, for the blob SDK."""
        options: TokenRequestOptions = {}
        if claims:
            options["claims"] = claims
        if tenant_id:
            options["tenant_id"] = tenant_id
        info = await self.get_token_info(*scopes, options=options)
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """AsyncSupportsTokenInfo protocol, for the blob SDK.

        A request with claims or a tenant comes from a service's authentication challenge (the cached
        token was refused): it goes to the credential, and a claims answer replaces the cached token.
        """
        if options and (options.get("claims") or options.get("tenant_id")):
            info: AccessTokenInfo = await self._credential.get_token_info(*scopes, options=options)  # type: ignore[attr-defined]
            if options.get("claims") and not options.get("tenant_id"):
                self._slot(scopes[0]).token = info
                self.refreshes += 1
            return info
        return await self.token(scopes[0])

    async def close(self) -> None:
        await self._credential.close()

    async def __aexit__(self, *args: object) -> None:
        await self.close()
