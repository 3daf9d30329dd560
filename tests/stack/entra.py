"""A fake Microsoft Entra ID authority (served over HTTPS; AZURE_AUTHORITY_HOST points at it).

Endpoints, as azure-identity and MSAL call them:
- `POST /{tenant}/oauth2/v2.0/token`: `client_credentials` with a client secret, a certificate-signed
  assertion (x5t#S256/x5t header, aud = the token endpoint) or a federated assertion (a token from a trusted
  external issuer whose iss+sub+aud match a federated credential of the app); `authorization_code` with PKCE
  (S256) for the public client; `refresh_token`.
- `GET /{tenant}/oauth2/v2.0/authorize`: validates client_id/redirect_uri/PKCE and answers with the code,
  by 302 (response_mode=query) or an auto-submitting HTML form (response_mode=form_post, what MSAL asks for).
- `GET /{tenant}/v2.0/.well-known/openid-configuration`, `GET /{tenant}/discovery/v2.0/keys`,
  `GET /common/discovery/instance` (MSAL instance discovery).

Errors carry Entra's body shape (`error`, `error_description` starting with `AADSTSnnnn:`, `error_codes`...).
Access tokens come from the shared TokenMint, so the fake Azure OpenAI and Azurite accept them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import html
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
from aiohttp import web

from .directory import AZURE_CLI_CLIENT_ID, AppRegistration, DirectoryUser, EntraDirectory, b64url
from .tokens import IssuedToken, TokenMint, audience_of

JSON_TYPE = "application/json"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLAIMS_SUPPORTED = [
    "sub",
    "iss",
    "cloud_instance_name",
    "cloud_instance_host_name",
    "cloud_graph_host_name",
    "msgraph_host",
    "aud",
    "exp",
    "iat",
    "auth_time",
    "acr",
    "nonce",
    "preferred_username",
    "name",
    "tid",
    "ver",
    "at_hash",
    "c_hash",
    "email",
]
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
ASSERTION_SKEW_S = 300
"""Clock skew Entra tolerates on assertion nbf/exp, in seconds."""
CODE_LIFETIME_S = 600
"""Authorization codes expire after 10 minutes."""
CERT_DOCS = "Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials ."
FEDERATION_DOCS = "https://learn.microsoft.com/entra/workload-id/workload-identity-federation"


class EntraError(Exception):
    """An error answer of the authority: HTTP status, OAuth error, AADSTS code and message."""

    def __init__(self, status: int, error: str, code: int, message: str) -> None:
        super().__init__(f"AADSTS{code}: {message}")
        self.status = status
        self.error = error
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        """Entra's JSON error body."""
        now = datetime.datetime.now(datetime.UTC)
        timestamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
        return {
            "error": self.error,
            "error_description": f"AADSTS{self.code}: {self.message} Trace ID: {trace_id} "
            f"Correlation ID: {correlation_id} Timestamp: {timestamp}",
            "error_codes": [self.code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"https://login.microsoftonline.com/error?code={self.code}",
        }

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        return web.Response(status=self.status, text=json.dumps(self.body()), content_type=JSON_TYPE)


def _missing(parameter: str) -> EntraError:
    return EntraError(
        400,
        "invalid_request",
        900144,
        f"The request body must contain the following parameter: '{parameter}'.",
    )


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


@dataclass
class EntraStats:
    """Counters of the authority."""

    token_requests: Counter[tuple[str, str, str, int]] = field(default_factory=Counter)
    """(grant_type, kind, app, status) -> count; kind is secret/certificate/federated:<issuer>/..."""
    errors: Counter[str] = field(default_factory=Counter)
    """"AADSTSnnnn" -> count."""
    authorize: Counter[int] = field(default_factory=Counter)
    claims_requests: int = 0
    """Token requests that carried a `claims` parameter (claims challenge / forced refresh)."""
    discovery: Counter[str] = field(default_factory=Counter)
    user_tokens: Counter[str] = field(default_factory=Counter)
    """Delegated tokens minted through the admin API (the fake `az`), by resource."""

    def as_json(self) -> dict[str, Any]:
        """JSON for /_admin/stats."""
        return {
            "token_requests": [
                {"grant": grant, "kind": kind, "app": app, "status": status, "count": count}
                for (grant, kind, app, status), count in sorted(self.token_requests.items())
            ],
            "errors": dict(self.errors),
            "authorize_requests": {str(status): count for status, count in self.authorize.items()},
            "claims_requests": self.claims_requests,
            "discovery_requests": dict(self.discovery),
            "az_tokens": dict(self.user_tokens),
        }


@dataclass
class _Attempt:
    """What a token request turned out to be, for stats (filled in as the request is understood)."""

    grant: str
    kind: str = "-"
    app: str = "unknown"


@dataclass(frozen=True)
class _AuthorizationCode:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scope: str
    nonce: str | None
    issued_at: float


@dataclass(frozen=True)
class _RefreshToken:
    client_id: str
    user: DirectoryUser


@dataclass(frozen=True)
class AuthorityKnobs:
    """The identity config's settings that concern the authority."""

    token_lifetime_s: int
    fail_next: int
    fail_status: int


class FakeEntra:
    """The authority's aiohttp application and state (codes, refresh tokens, stats)."""

    def __init__(
        self,
        mint: TokenMint,
        directory: EntraDirectory,
        *,
        knobs: Callable[[], AuthorityKnobs],
        consume_failure: Callable[[], bool],
        record: Callable[[str, int], None],
    ) -> None:
        self.mint = mint
        self.directory = directory
        self._knobs = knobs
        self._consume_failure = consume_failure
        self._record = record
        self.stats = EntraStats()
        self._codes: dict[str, _AuthorizationCode] = {}
        self._redeemed: set[str] = set()
        self._refresh_tokens: dict[str, _RefreshToken] = {}

    def reset(self) -> None:
        """Clear the counters (codes and refresh tokens stay valid)."""
        self.stats = EntraStats()

    def app(self) -> web.Application:
        """The authority's routes."""
        app = web.Application()
        app.router.add_get("/common/discovery/instance", self._instance_discovery)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._openid_configuration)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._keys)
        app.router.add_get("/{tenant}/oauth2/v2.0/authorize", self._authorize)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        return app

    # ---- discovery ------------------------------------------------------------------------------------

    def _tenant_or_error(self, tenant: str) -> str:
        known = {self.directory.tenant_id, "organizations", "common"}
        if tenant.lower() not in known:
            raise EntraError(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
                "into the correct cloud. Check with your subscription administrator, this may happen if there "
                "are no active subscriptions for the tenant.",
            )
        return self.directory.tenant_id

    async def _instance_discovery(self, request: web.Request) -> web.Response:
        self.stats.discovery["instance"] += 1
        base = f"https://{request.host}"
        endpoint = request.query.get("authorization_endpoint", "")
        path = urlsplit(endpoint).path.strip("/").split("/")
        tenant = path[0] if path and path[0] else "common"
        body = {
            "tenant_discovery_endpoint": f"{base}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [
                {
                    "preferred_network": request.host,
                    "preferred_cache": request.host,
                    "aliases": [request.host],
                }
            ],
        }
        return web.json_response(body)

    async def _openid_configuration(self, request: web.Request) -> web.Response:
        self.stats.discovery["openid-configuration"] += 1
        tenant = request.match_info["tenant"]
        try:
            self._tenant_or_error(tenant)
        except EntraError as error:
            return error.response()
        base = f"https://{request.host}"
        issuer_tenant = self.directory.tenant_id if tenant == self.directory.tenant_id else "{tenantid}"
        body = {
            "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/{issuer_tenant}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/{tenant}/oauth2/v2.0/logout",
            "claims_supported": CLAIMS_SUPPORTED,
            "kerberos_endpoint": f"{base}/{tenant}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        return web.json_response(body)

    async def _keys(self, request: web.Request) -> web.Response:
        self.stats.discovery["keys"] += 1
        return web.json_response({"keys": [self.mint.jwk()]})

    # ---- authorize (interactive) -----------------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.Response:
        response = self._authorize_answer(request)
        self.stats.authorize[response.status] += 1
        return response

    def _authorize_answer(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            self._tenant_or_error(request.match_info["tenant"])
            app = self._app(query.get("client_id"))
        except EntraError as error:
            return _error_page(error)
        redirect_uri = query.get("redirect_uri", "")
        if not app.accepts_redirect(redirect_uri):
            return _error_page(
                EntraError(
                    400,
                    "invalid_request",
                    50011,
                    f"The redirect URI '{redirect_uri}' specified in the request does not match the redirect URIs "
                    f"configured for the application '{app.client_id}'. Make sure the redirect URI sent in the "
                    "request matches one added to your application in the Azure portal.",
                )
            )
        state = query.get("state")
        response_mode = query.get("response_mode", "query")
        try:
            if query.get("response_type") != "code":
                raise EntraError(
                    400,
                    "unsupported_response_type",
                    700054,
                    "response_type 'id_token' is not enabled for the application.",
                )
            if not query.get("code_challenge") or query.get("code_challenge_method") != "S256":
                raise EntraError(
                    400,
                    "invalid_request",
                    9002325,
                    "Proof Key for Code Exchange (S256) is required for cross-origin authorization code redemption.",
                )
            _resource_of(query.get("scope", ""), app_only=False)
        except EntraError as error:
            fields = {"error": error.error, "error_description": str(error), "state": state}
            return _to_redirect_uri(redirect_uri, response_mode, fields)
        code = f"1.A{secrets.token_urlsafe(96)}"
        self._codes[code] = _AuthorizationCode(
            client_id=app.client_id,
            redirect_uri=redirect_uri,
            code_challenge=query["code_challenge"],
            scope=query.get("scope", ""),
            nonce=query.get("nonce"),
            issued_at=time.time(),
        )
        fields = {
            "code": code,
            "client_info": _client_info(self.directory.user, self.directory.tenant_id),
            "state": state,
            "session_state": str(uuid.uuid4()),
        }
        return _to_redirect_uri(redirect_uri, response_mode, fields)

    # ---- token -----------------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        values = {name: value for name, value in form.items() if isinstance(value, str)}
        attempt = _Attempt(grant=values.get("grant_type") or "-")
        if values.get("claims"):
            self.stats.claims_requests += 1
        try:
            body = self._token_answer(request, values, attempt)
            response = web.Response(
                text=json.dumps(body), content_type=JSON_TYPE, headers={"Cache-Control": "no-store, no-cache"}
            )
        except EntraError as error:
            self.stats.errors[f"AADSTS{error.code}"] += 1
            response = error.response()
        self.stats.token_requests[(attempt.grant, attempt.kind, attempt.app, response.status)] += 1
        self._record("entra", response.status)
        return response

    def _token_answer(
        self, request: web.Request, form: Mapping[str, str], attempt: _Attempt
    ) -> dict[str, Any]:
        knobs = self._knobs()
        if self._consume_failure():
            raise EntraError(
                knobs.fail_status,
                "temporarily_unavailable",
                90033,
                "A transient error has occurred. Please try again.",
            )
        tenant = request.match_info["tenant"]
        self._tenant_or_error(tenant)
        if not form.get("grant_type"):
            raise _missing("grant_type")
        app = self._app(form.get("client_id"))
        attempt.app = app.name
        if attempt.grant == "client_credentials":
            self._authenticate_client(request, tenant, app, form, attempt)
            audience, _ = _resource_of(form.get("scope", ""), app_only=True)
            issued = self.mint.mint(
                audience, app.principal, source="entra", lifetime_s=knobs.token_lifetime_s
            )
            return _token_body(issued.token, knobs.token_lifetime_s)
        if attempt.grant == "authorization_code":
            attempt.kind = "authorization_code"
            return self._redeem_code(request, app, form)
        if attempt.grant == "refresh_token":
            attempt.kind = "refresh_token"
            return self._redeem_refresh_token(request, app, form)
        raise EntraError(
            400,
            "unsupported_grant_type",
            70003,
            f"The app requested an unsupported grant type '{attempt.grant}'.",
        )

    def _app(self, client_id: str | None) -> AppRegistration:
        if not client_id:
            raise _missing("client_id")
        app = self.directory.app_by_client_id(client_id)
        if app is None:
            raise EntraError(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{self.directory.tenant_id}'. This can happen if the application has not been installed by the "
                "administrator of the tenant or consented to by any user in the tenant. You may have sent your "
                "authentication request to the wrong tenant.",
            )
        return app

    def _authenticate_client(
        self,
        request: web.Request,
        tenant: str,
        app: AppRegistration,
        form: Mapping[str, str],
        attempt: _Attempt,
    ) -> None:
        """Check the client secret or assertion; notes the credential kind in `attempt` for stats."""
        secret, assertion = form.get("client_secret"), form.get("client_assertion")
        if app.public_client and (secret or assertion):
            raise EntraError(
                401,
                "invalid_client",
                700025,
                "Client is public so neither 'client_assertion' nor 'client_secret' should be presented.",
            )
        if secret is not None:
            attempt.kind = "secret"
            if app.secret is None or not hmac.compare_digest(secret.encode(), app.secret.encode()):
                raise EntraError(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                    f"secret value, not the client secret ID, for a secret added to app '{app.client_id}'.",
                )
            return
        if assertion is not None:
            attempt.kind = "assertion"
            if form.get("client_assertion_type") != JWT_BEARER:
                raise EntraError(
                    400,
                    "invalid_request",
                    7000216,
                    "'client_assertion_type' must be 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'.",
                )
            self._check_assertion(request, tenant, app, assertion, attempt)
            return
        raise EntraError(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )

    def _check_assertion(
        self, request: web.Request, tenant: str, app: AppRegistration, assertion: str, attempt: _Attempt
    ) -> None:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified: dict[str, Any] = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise EntraError(401, "invalid_client", 50027, "JWT token is invalid or malformed.") from None
        if "x5t#S256" in header or "x5t" in header or unverified.get("iss") == app.client_id:
            attempt.kind = "certificate"
            self._check_certificate_assertion(request, tenant, app, assertion, header)
            return
        issuer = self.directory.issuer_for(str(unverified.get("iss", "")))
        attempt.kind = f"federated:{issuer.name if issuer else 'unknown'}"
        self._check_federated_assertion(app, assertion, unverified, issuer)

    def _check_certificate_assertion(
        self, request: web.Request, tenant: str, app: AppRegistration, assertion: str, header: dict[str, Any]
    ) -> None:
        certificate = next((cert for cert in app.certificates if cert.matches(header)), None)
        if certificate is None:
            thumbprint = header.get("x5t#S256") or header.get("x5t") or "(none)"
            raise EntraError(
                401,
                "invalid_client",
                700027,
                "The certificate with identifier used to sign the client assertion is not registered on "
                f"application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', "
                f"Please visit the Azure Portal, Enterprise applications, search for the app with ID: "
                f"{app.client_id}, and check the certificate.] {CERT_DOCS}",
            )
        algorithm = header.get("alg")
        try:
            if algorithm not in ("RS256", "PS256"):
                raise jwt.InvalidAlgorithmError(f"alg {algorithm!r}")
            claims: dict[str, Any] = jwt.decode(
                assertion,
                certificate.public_key(),
                algorithms=[algorithm],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise EntraError(
                401,
                "invalid_client",
                700027,
                "Client assertion contains an invalid signature. [Reason - The provided signature value did not "
                f"match the expected signature value., Thumbprint of key used by client: "
                f"'{header.get('x5t#S256') or header.get('x5t')}'] {CERT_DOCS}",
            ) from None
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            raise EntraError(
                401,
                "invalid_client",
                700021,
                f"Client assertion application identifier doesn't match 'client_id' parameter. {CERT_DOCS}",
            )
        _check_lifetime(claims)
        base = f"https://{request.host}"
        accepted = {
            f"{base}/{name}/oauth2/{version}token"
            for name in {tenant, self.directory.tenant_id}
            for version in ("v2.0/", "")
        } | {f"{base}/{self.directory.tenant_id}/v2.0"}
        audiences = claims.get("aud")
        given = audiences if isinstance(audiences, list) else [audiences]
        if not accepted.intersection(a for a in given if isinstance(a, str)):
            raise EntraError(
                401,
                "invalid_client",
                700023,
                f"Client assertion audience claim does not match Realm issuer. {CERT_DOCS}",
            )

    def _check_federated_assertion(
        self, app: AppRegistration, assertion: str, unverified: dict[str, Any], issuer: Any
    ) -> None:
        iss, sub = unverified.get("iss"), unverified.get("sub")
        audiences = unverified.get("aud")
        given = [a for a in (audiences if isinstance(audiences, list) else [audiences]) if isinstance(a, str)]
        no_match = EntraError(
            400,
            "invalid_request",
            70021,
            "No matching federated identity record found for presented assertion. "
            f"Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'. Assertion Audience: '{','.join(given)}'. "
            f"{FEDERATION_DOCS}",
        )
        if issuer is None or not any(credential.issuer == iss for credential in app.federated):
            raise no_match
        try:
            claims = issuer.verify_signature(assertion)
        except jwt.PyJWTError:
            raise EntraError(
                401,
                "invalid_client",
                50013,
                "Assertion failed signature validation. [Reason - The key was not found., Key ID: "
                f"'{jwt.get_unverified_header(assertion).get('kid')}', Issuer: '{iss}']",
            ) from None
        _check_lifetime(claims)
        for credential in app.federated:
            if (
                credential.issuer == iss
                and credential.subject == sub
                and set(given) & set(credential.audiences)
            ):
                return
        raise no_match

    # ---- delegated (user) tokens -----------------------------------------------------------------------

    def _redeem_code(
        self, request: web.Request, app: AppRegistration, form: Mapping[str, str]
    ) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise _missing("code")
        if code in self._redeemed:
            raise EntraError(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an "
                "existing refresh token.",
            )
        grant = self._codes.pop(code, None)
        if grant is None or grant.client_id != app.client_id:
            raise EntraError(
                400, "invalid_grant", 70000, "The provided value for the 'code' parameter is not valid."
            )
        self._redeemed.add(code)
        if time.time() - grant.issued_at > CODE_LIFETIME_S:
            raise EntraError(
                400,
                "invalid_grant",
                70008,
                "The provided authorization code or refresh token has expired due to inactivity. Send a new "
                "interactive authorization request for this user and resource.",
            )
        if form.get("redirect_uri") != grant.redirect_uri:
            raise EntraError(
                400,
                "invalid_grant",
                500112,
                f"The reply address '{form.get('redirect_uri')}' does not match the reply address "
                f"'{grant.redirect_uri}' provided when requesting Authorization code.",
            )
        verifier = form.get("code_verifier") or ""
        if b64url(hashlib.sha256(verifier.encode()).digest()) != grant.code_challenge:
            raise EntraError(
                400,
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
            )
        scope = form.get("scope") or grant.scope
        return self._user_tokens(request, app, self.directory.user, scope, nonce=grant.nonce)

    def _redeem_refresh_token(
        self, request: web.Request, app: AppRegistration, form: Mapping[str, str]
    ) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise _missing("refresh_token")
        grant = self._refresh_tokens.get(token)
        if grant is None or grant.client_id != app.client_id:
            raise EntraError(
                400, "invalid_grant", 9002313, "Invalid request. Request is malformed or invalid."
            )
        return self._user_tokens(request, app, grant.user, form.get("scope", ""), nonce=None)

    def _user_tokens(
        self,
        request: web.Request,
        app: AppRegistration,
        user: DirectoryUser,
        scope: str,
        *,
        nonce: str | None,
    ) -> dict[str, Any]:
        audience, granted = _resource_of(scope, app_only=False)
        lifetime = self._knobs().token_lifetime_s
        issued = self.mint_user_token(audience, user, app.client_id, source="entra", lifetime_s=lifetime)
        refresh_token = f"1.A{secrets.token_urlsafe(180)}"
        self._refresh_tokens[refresh_token] = _RefreshToken(app.client_id, user)
        now = int(time.time())
        tenant = self.directory.tenant_id
        id_claims = {
            "aud": app.client_id,
            "iss": f"https://{request.host}/{tenant}/v2.0",
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "name": user.display_name,
            "oid": user.object_id,
            "preferred_username": user.upn,
            "sub": b64url(hashlib.sha256(f"{user.object_id}:{app.client_id}".encode()).digest())[:43],
            "tid": tenant,
            "uti": uuid.uuid4().hex,
            "ver": "2.0",
            **({"nonce": nonce} if nonce else {}),
        }
        return {
            **_token_body(issued.token, lifetime),
            "scope": " ".join(granted),
            "refresh_token": refresh_token,
            "id_token": self.mint.sign(id_claims),
            "client_info": _client_info(user, tenant),
        }

    def mint_user_token(
        self, audience: str, user: DirectoryUser, client_id: str, *, source: str, lifetime_s: int
    ) -> IssuedToken:
        """A delegated access token (v1 shape, `scp`/`upn`) for `user` through the public client `client_id`."""
        return self.mint.mint(
            audience,
            user.principal(client_id),
            source=source,
            lifetime_s=lifetime_s,
            extra_claims={
                "idtyp": "user",
                "appidacr": "0",
                "acr": "1",
                "amr": ["pwd", "mfa"],
                "scp": "user_impersonation",
                "upn": user.upn,
                "unique_name": user.upn,
                "name": user.display_name,
            },
        )

    async def az_token(self, request: web.Request) -> web.Response:
        """Admin: a user token as `az account get-access-token` would return it (the fake az calls this)."""
        try:
            body = json.loads(await request.read())
            resource = body["resource"]
            tenant = body.get("tenant") or self.directory.tenant_id
            if not isinstance(resource, str) or not isinstance(tenant, str):
                raise TypeError("resource and tenant must be strings")
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response({"error": f"bad request: {error}"}, status=400)
        try:
            self._tenant_or_error(tenant)
        except EntraError as error:
            self._record("az-cli", 400)
            return web.json_response({"error": str(error)}, status=400)
        lifetime = self._knobs().token_lifetime_s
        audience = audience_of(resource)
        issued = self.mint_user_token(
            audience, self.directory.user, AZURE_CLI_CLIENT_ID, source="az-cli", lifetime_s=lifetime
        )
        self.stats.user_tokens[audience] += 1
        self._record("az-cli", 200)
        return web.json_response(
            {
                "accessToken": issued.token,
                "expires_on": issued.expires_on,
                "subscription": self.directory.subscription_id,
                "tenant": self.directory.tenant_id,
                "tokenType": "Bearer",
            }
        )


def _token_body(access_token: str, lifetime_s: int) -> dict[str, Any]:
    expires_in = max(lifetime_s - 1, 1)
    return {
        "token_type": "Bearer",
        "expires_in": expires_in,
        "ext_expires_in": expires_in,
        "access_token": access_token,
    }


def _resource_of(scope: str, *, app_only: bool) -> tuple[str, list[str]]:
    """The token audience for a scope parameter, and the granted resource scopes."""
    scopes = [s for s in scope.split() if s not in OIDC_SCOPES]
    if not scopes:
        if app_only:
            raise _missing("scope")
        raise EntraError(
            400,
            "invalid_scope",
            70011,
            f"The provided value for the input parameter 'scope' is not valid: '{scope}'.",
        )
    resources = set()
    for item in scopes:
        parts = urlsplit(item)
        if not parts.scheme or not parts.netloc or "/" not in parts.path:
            raise EntraError(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {item} is not valid.",
            )
        if app_only and not item.endswith("/.default"):
            raise EntraError(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {item} is not valid. Client credential flows must have a scope "
                "value with /.default suffixed to the resource identifier (application ID URI).",
            )
        resources.add(item.rsplit("/", 1)[0])
    if len(resources) > 1:
        raise EntraError(
            400,
            "invalid_scope",
            28000,
            "Provided value for the input parameter scope is not valid because it contains more than one resource.",
        )
    return resources.pop(), scopes


def _check_lifetime(claims: Mapping[str, Any]) -> None:
    now = time.time()
    expires, not_before = claims.get("exp"), claims.get("nbf", claims.get("iat", 0))
    if not isinstance(expires, int | float) or not isinstance(not_before, int | float):
        raise EntraError(
            401, "invalid_client", 50027, "JWT token is invalid or malformed: exp/nbf are missing."
        )
    if now > expires + ASSERTION_SKEW_S or now + ASSERTION_SKEW_S < not_before:
        raise EntraError(
            401,
            "invalid_client",
            700024,
            f"Client assertion is not within its valid time range. Current time: {_iso(now)}, assertion valid "
            f"from {_iso(not_before)}, expiry time of assertion {_iso(expires)}. {CERT_DOCS}",
        )


def _client_info(user: DirectoryUser, tenant_id: str) -> str:
    return b64url(json.dumps({"uid": user.object_id, "utid": tenant_id}).encode())


def _to_redirect_uri(redirect_uri: str, response_mode: str, fields: Mapping[str, str | None]) -> web.Response:
    present = {name: value for name, value in fields.items() if value is not None}
    if response_mode == "form_post":
        inputs = "".join(
            f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}" />'
            for name, value in present.items()
        )
        page = (
            "<html><head><title>Working...</title></head><body>"
            f'<form method="POST" name="hiddenform" action="{html.escape(redirect_uri)}">{inputs}'
            '<noscript><p>Script is disabled. Click Submit to continue.</p><input type="submit" value="Submit" />'
            '</noscript></form><script language="javascript">document.forms[0].submit();</script></body></html>'
        )
        return web.Response(text=page, content_type="text/html")
    separator = "&" if "?" in redirect_uri else "?"
    return web.Response(status=302, headers={"Location": f"{redirect_uri}{separator}{urlencode(present)}"})


def _error_page(error: EntraError) -> web.Response:
    page = (
        "<html><head><title>Sign in to your account</title></head><body>"
        f"<h1>Sorry, but we're having trouble signing you in.</h1><p>{html.escape(str(error))}</p></body></html>"
    )
    return web.Response(status=error.status, text=page, content_type="text/html")
