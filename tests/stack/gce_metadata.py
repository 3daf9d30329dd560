"""A fake Google Compute Engine metadata server (plain HTTP; GCE_METADATA_HOST=127.0.0.1:<port>).

`GET /computeMetadata/v1/instance/service-accounts/default/identity?audience=A[&format=full]` with the
header `Metadata-Flavor: Google` answers a Google-signed ID token (iss https://accounts.google.com, sub = the
service account's numeric unique id, aud = A) as text. Without the header: 403, as on GCE. Also serves the
account's email, the project id and `/` (the "ping" Google's libraries use to detect GCE).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .directory import ExternalIssuer, GcpServiceAccount

FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
ACCOUNT_PREFIX = "/computeMetadata/v1/instance/service-accounts/"


class FakeGceMetadata:
    """The metadata server's aiohttp application; counts requests by endpoint and status."""

    def __init__(
        self, issuer: ExternalIssuer, account: GcpServiceAccount, *, record: Callable[[str, int], None]
    ) -> None:
        self.issuer = issuer
        self.account = account
        self._record = record
        self.requests: Counter[tuple[str, int]] = Counter()
        self.audiences: Counter[str] = Counter()
        self._instance_id = str(10**18 + uuid.uuid4().int % (9 * 10**18))
        self._created = int(time.time()) - 86400

    def reset(self) -> None:
        """Clear the counters."""
        self.requests.clear()
        self.audiences.clear()

    def stats(self) -> dict[str, Any]:
        """JSON for /_admin/stats: `requests` total, `by_endpoint` {"identity": {"200": n}}, `audiences`."""
        by_endpoint: dict[str, dict[str, int]] = {}
        for (endpoint, status), count in sorted(self.requests.items()):
            by_endpoint.setdefault(endpoint, {})[str(status)] = count
        return {
            "requests": sum(self.requests.values()),
            "by_endpoint": by_endpoint,
            "audiences": dict(self.audiences),
        }

    def app(self) -> web.Application:
        """The routes."""
        app = web.Application()
        app.router.add_get("/", self._ping)
        app.router.add_get("/computeMetadata/v1/project/project-id", self._project_id)
        app.router.add_get(ACCOUNT_PREFIX + "{account}/email", self._email)
        app.router.add_get(ACCOUNT_PREFIX + "{account}/identity", self._identity)
        return app

    def _answer(
        self, endpoint: str, request: web.Request, produce: Callable[[], web.Response]
    ) -> web.Response:
        if request.headers.get(FLAVOR_HEADER) != FLAVOR or "X-Forwarded-For" in request.headers:
            response = web.Response(
                status=403,
                text=f"Your client does not have permission to get URL <code>{request.path}</code> from this "
                "server. Missing Metadata-Flavor:Google header.",
                content_type="text/html",
            )
        else:
            response = produce()
        response.headers[FLAVOR_HEADER] = FLAVOR
        response.headers["Server"] = "Metadata Server for VM"
        self.requests[(endpoint, response.status)] += 1
        if endpoint == "identity":
            self._record("gce-metadata", response.status)
        return response

    def _known_account(self, request: web.Request) -> bool:
        return request.match_info["account"] in ("default", self.account.email)

    async def _ping(self, request: web.Request) -> web.Response:
        return self._answer("ping", request, lambda: web.Response(text="computeMetadata/\n"))

    async def _project_id(self, request: web.Request) -> web.Response:
        return self._answer("project-id", request, lambda: web.Response(text=self.account.project_id))

    async def _email(self, request: web.Request) -> web.Response:
        def produce() -> web.Response:
            if not self._known_account(request):
                return web.Response(status=404, text="Not Found")
            return web.Response(text=self.account.email)

        return self._answer("email", request, produce)

    async def _identity(self, request: web.Request) -> web.Response:
        def produce() -> web.Response:
            if not self._known_account(request):
                return web.Response(status=404, text="Not Found")
            audience = request.query.get("audience", "")
            if not audience:
                return web.Response(status=400, text="non-empty audience parameter required")
            self.audiences[audience] += 1
            return web.Response(text=self.id_token(audience, full=request.query.get("format") == "full"))

        return self._answer("identity", request, produce)

    def id_token(self, audience: str, *, full: bool = False) -> str:
        """A Google ID token for the service account, as the metadata server signs it."""
        claims: dict[str, Any] = {
            "azp": self.account.unique_id,
            "email": self.account.email,
            "email_verified": True,
        }
        if full:
            claims["google"] = {
                "compute_engine": {
                    "instance_creation_timestamp": self._created,
                    "instance_id": self._instance_id,
                    "instance_name": "batch-worker-vm",
                    "project_id": self.account.project_id,
                    "project_number": int(self.account.project_number),
                    "zone": "europe-west1-b",
                }
            }
        return self.issuer.mint(self.account.unique_id, audience=audience, claims=claims)
