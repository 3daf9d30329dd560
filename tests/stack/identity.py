"""The identity server: a fake managed-identity endpoint (the App Service / Container Apps protocol, over plain
HTTP) and the admin API of every identity stand-in (the Entra authority and the GCE metadata server live in
the same process and share its stats, config and token mint).

azure-identity calls `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=R[&client_id=C]` with the
header `X-IDENTITY-HEADER: {IDENTITY_HEADER}`. Every successful call mints a new token. The admin API
(`/_admin/...`, no auth) exposes stats, revocation, outage knobs and the fake `az`'s token minting.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .directory import EntraDirectory
from .entra import AuthorityKnobs, FakeEntra
from .gce_metadata import FakeGceMetadata
from .settings import SettingsError, as_json, merge
from .tokens import Principal, TokenMint, audience_of

JSON_TYPE = "application/json"
MSI_API_VERSION = "2019-08-01"


@dataclass
class IdentityConfig:
    """Behaviour of the identity server; changed at run time through POST /_admin/config."""

    token_lifetime_s: int = 3600
    """Lifetime of issued tokens, in seconds."""
    fail_next: int = 0
    """The next N token requests fail with `fail_status`."""
    fail_status: int = 500
    """HTTP status of a forced failure."""
    down: bool = False
    """While true, token requests get their connection dropped without an answer."""
    authority_fail_next: int = 0
    """The next N requests to the Entra token endpoint fail with `authority_fail_status`."""
    authority_fail_status: int = 503
    """HTTP status of a forced authority failure (azure-identity retries 5xx itself, up to 3 times)."""


@dataclass(frozen=True)
class ManagedIdentities:
    """The identities the fake MSI endpoint can issue tokens for, and its shared secret."""

    system_assigned: Principal
    user_assigned: Principal
    user_assigned_resource_id: str
    header_secret: str
    """Expected value of the X-IDENTITY-HEADER request header (IDENTITY_HEADER)."""

    @classmethod
    def new(cls) -> ManagedIdentities:
        """Fresh random ids and secret."""
        subscription = uuid.uuid4()
        return cls(
            system_assigned=Principal.new("system-assigned"),
            user_assigned=Principal.new("user-assigned"),
            user_assigned_resource_id=f"/subscriptions/{subscription}/resourceGroups/rg-local/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/id-batch-worker",
            header_secret=uuid.uuid4().hex,
        )

    def as_json(self) -> dict[str, Any]:
        """Ids for the ready file."""
        return {
            "system_assigned": self.system_assigned.as_json(),
            "user_assigned": {
                **self.user_assigned.as_json(),
                "resource_id": self.user_assigned_resource_id,
            },
            "identity_header": self.header_secret,
        }


@dataclass
class IdentityStats:
    """Counters over token requests of every kind: msi, entra, gce-metadata (identity tokens), az-cli."""

    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, status: int) -> None:
        """Count one answered token request."""
        self.requests += 1
        self.by_kind[kind] += 1
        self.by_status[str(status)] += 1

    def clear(self) -> None:
        """Zero every counter."""
        self.requests = 0
        self.by_status.clear()
        self.by_kind.clear()


def _msi_error(status: int, message: str) -> web.Response:
    body = {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type=JSON_TYPE)


class FakeIdentity:
    """The aiohttp application of the identity server and its state."""

    def __init__(
        self,
        mint: TokenMint,
        identities: ManagedIdentities,
        config: IdentityConfig,
        directory: EntraDirectory,
    ) -> None:
        self.mint = mint
        self.identities = identities
        self.initial_config = config
        self.config = merge(config, {})
        self.stats = IdentityStats()
        self.entra = FakeEntra(
            mint,
            directory,
            knobs=self._authority_knobs,
            consume_failure=self._consume_authority_failure,
            record=self.stats.record,
        )
        self.gce = FakeGceMetadata(directory.google, directory.gcp_account, record=self.stats.record)

    def _authority_knobs(self) -> AuthorityKnobs:
        config = self.config
        return AuthorityKnobs(
            token_lifetime_s=config.token_lifetime_s,
            fail_next=config.authority_fail_next,
            fail_status=config.authority_fail_status,
        )

    def _consume_authority_failure(self) -> bool:
        if self.config.authority_fail_next > 0:
            self.config.authority_fail_next -= 1
            return True
        return False

    def app(self) -> web.Application:
        """The web application: the MSI token endpoint and the admin API."""
        app = web.Application()
        app.router.add_get("/msi/token", self._msi_token)
        app.router.add_post("/_admin/az-token", self.entra.az_token)
        app.router.add_get("/_admin/stats", self._admin_stats)
        app.router.add_post("/_admin/revoke", self._admin_revoke)
        app.router.add_post("/_admin/config", self._admin_config)
        app.router.add_post("/_admin/reset", self._admin_reset)
        return app

    async def _msi_token(self, request: web.Request) -> web.StreamResponse:
        response = self._msi_answer(request)
        self.stats.record("msi", response.status)
        return response

    def _msi_answer(self, request: web.Request) -> web.StreamResponse:
        config = self.config
        if config.down:
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        refusal = self._msi_refusal(request)
        if refusal is not None:
            return refusal
        resource = request.query["resource"]
        principal = self._principal_for(request.query)
        if principal is None:
            return _msi_error(400, "Unable to load the proper Managed Identity.")
        issued = self.mint.mint(
            audience_of(resource), principal, source="msi", lifetime_s=config.token_lifetime_s
        )
        body = {
            "access_token": issued.token,
            "expires_on": str(issued.expires_on),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": principal.client_id,
        }
        return web.Response(body=json.dumps(body).encode(), content_type=JSON_TYPE)

    def _msi_refusal(self, request: web.Request) -> web.Response | None:
        """The error answer for a forced failure, a bad secret or bad query parameters, else None."""
        config = self.config
        if config.fail_next > 0:
            config.fail_next -= 1
            return _msi_error(
                config.fail_status, "An unexpected error occurred while fetching the AAD Token."
            )
        if request.headers.get("X-IDENTITY-HEADER") != self.identities.header_secret:
            return _msi_error(401, "Unauthorized: the X-IDENTITY-HEADER header is missing or invalid.")
        if request.query.get("api-version") != MSI_API_VERSION:
            return _msi_error(400, f"The api-version must be {MSI_API_VERSION}.")
        if not request.query.get("resource"):
            return _msi_error(400, "Required query variable 'resource' is missing.")
        return None

    def _principal_for(self, query: Any) -> Principal | None:
        """The identity selected by client_id / object_id / principal_id / mi_res_id, if any matches."""
        user = self.identities.user_assigned
        selectors = {
            "client_id": user.client_id,
            "object_id": user.object_id,
            "principal_id": user.object_id,
            "mi_res_id": self.identities.user_assigned_resource_id,
        }
        given = [name for name in selectors if name in query]
        if not given:
            return self.identities.system_assigned
        if len(given) == 1 and query[given[0]].lower() == selectors[given[0]].lower():
            return user
        return None

    async def _admin_stats(self, _request: web.Request) -> web.Response:
        stats = self.stats
        body = {
            "requests": stats.requests,
            "by_status": dict(stats.by_status),
            "by_kind": dict(stats.by_kind),
            **self.mint.stats(),
            "entra": self.entra.stats.as_json(),
            "gce_metadata": self.gce.stats(),
        }
        return web.Response(body=json.dumps(body).encode(), content_type=JSON_TYPE)

    async def _admin_revoke(self, _request: web.Request) -> web.Response:
        revoked = self.mint.revoke_all()
        return web.Response(body=json.dumps({"revoked": revoked}).encode(), content_type=JSON_TYPE)

    async def _admin_config(self, request: web.Request) -> web.Response:
        try:
            updates = json.loads(await request.read())
            if not isinstance(updates, dict):
                raise SettingsError("the body must be a JSON object of settings")
            self.config = merge(self.config, updates)
        except (ValueError, SettingsError) as error:
            return web.Response(status=400, text=json.dumps({"error": str(error)}), content_type=JSON_TYPE)
        return web.Response(body=json.dumps(as_json(self.config)).encode(), content_type=JSON_TYPE)

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.config = merge(self.initial_config, {})
        self.stats.clear()
        self.entra.reset()
        self.gce.reset()
        self.mint.clear_stats()
        return web.Response(body=json.dumps(as_json(self.config)).encode(), content_type=JSON_TYPE)
