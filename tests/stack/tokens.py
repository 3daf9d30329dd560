"""The stack's token mint: Entra-shaped RS256 access tokens, verification with a cache, revocation.

One mint lives in the fakes process and is shared by the identity server (which issues tokens) and the
fake Azure OpenAI (which verifies them). The parent process loads the same signing key to mint storage
tokens without HTTP (Azurite does not check signatures, only claims).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

DEFAULT_LIFETIME_S = 3600
"""Lifetime of a minted token, in seconds."""

STORAGE_AUDIENCE = "https://storage.azure.com"
COGNITIVE_SERVICES_AUDIENCE = "https://cognitiveservices.azure.com"

_CACHE_LIMIT = 50_000
"""Verification results kept before the cache is cleared (entries, not bytes)."""


@dataclass(frozen=True)
class Principal:
    """A service principal or managed identity that tokens are issued to."""

    name: str
    """Label used in stats, e.g. "system-assigned"."""
    client_id: str
    """Application (client) id: the `appid` / `azp` claims."""
    object_id: str
    """Object id: the `oid` / `sub` claims."""

    def as_json(self) -> dict[str, str]:
        """The ids as a JSON object (for the ready file)."""
        return {"name": self.name, "client_id": self.client_id, "object_id": self.object_id}

    @classmethod
    def new(cls, name: str) -> Principal:
        """A principal with fresh random ids."""
        return cls(name=name, client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()))


@dataclass(frozen=True)
class IssuedToken:
    """A minted access token and when it expires."""

    token: str
    expires_on: int
    """Expiry as Unix epoch seconds."""
    jti: str


class InvalidTokenError(Exception):
    """The token is malformed, unsigned by the mint, for another audience, expired or revoked."""


def audience_of(resource_or_scope: str) -> str:
    """The `aud` claim for a resource or a scope: "https://x/.default" -> "https://x"."""
    return resource_or_scope.removesuffix("/.default")


class TokenMint:
    """Issues and verifies RS256 JWTs shaped like Entra v1 app-only access tokens."""

    def __init__(
        self,
        tenant_id: str,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
        lifetime_s: int = DEFAULT_LIFETIME_S,
    ) -> None:
        self.tenant_id = tenant_id
        self.lifetime_s = lifetime_s
        self._private_key = private_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public_key = self._private_key.public_key()
        public_der = self._public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = base64.urlsafe_b64encode(hashlib.sha256(public_der).digest()[:15]).decode()
        self.issuer = f"https://sts.windows.net/{tenant_id}/"
        self._issued: set[str] = set()
        self._revoked: set[str] = set()
        self._issued_by: Counter[tuple[str, str, str]] = Counter()
        self._cache: dict[str, dict[str, Any] | None] = {}

    @classmethod
    def from_pem_file(cls, path: Path, tenant_id: str, *, lifetime_s: int = DEFAULT_LIFETIME_S) -> TokenMint:
        """A mint that signs with the RSA key stored at `path` (written by `write_private_key`)."""
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"{path} does not hold an RSA private key")
        return cls(tenant_id, private_key=key, lifetime_s=lifetime_s)

    def write_private_key(self, path: Path) -> None:
        """Store the signing key as unencrypted PKCS#8 PEM, readable by the owner only."""
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.touch(mode=0o600)
        path.write_bytes(pem)

    def mint(
        self,
        audience: str,
        principal: Principal,
        *,
        source: str,
        lifetime_s: int | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> IssuedToken:
        """Sign a new token (fresh `jti`) for `principal`; `source` labels the issuing endpoint in stats.

        `extra_claims` are added to (or replace) the app-only claims, e.g. `upn`/`scp` for a user token.
        """
        now = int(time.time())
        expires_on = now + (self.lifetime_s if lifetime_s is None else lifetime_s)
        jti = uuid.uuid4().hex
        claims = {
            "aud": audience,
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": expires_on,
            "tid": self.tenant_id,
            "oid": principal.object_id,
            "sub": principal.object_id,
            "appid": principal.client_id,
            "azp": principal.client_id,
            "appidacr": "2",
            "idtyp": "app",
            "ver": "1.0",
            "jti": jti,
            "uti": jti,
            **(extra_claims or {}),
        }
        token = jwt.encode(claims, self._private_key, algorithm="RS256", headers={"kid": self.kid})
        self._issued.add(jti)
        self._issued_by[(source, audience, principal.name)] += 1
        return IssuedToken(token=token, expires_on=expires_on, jti=jti)

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Sign arbitrary claims with the mint's key (e.g. an ID token); not counted, not verifiable by `verify`
        unless the claims have the access-token shape."""
        return jwt.encode(dict(claims), self._private_key, algorithm="RS256", headers={"kid": self.kid})

    def jwk(self) -> dict[str, Any]:
        """The public signing key as a JWK (for the authority's jwks_uri)."""
        key: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self._public_key, as_dict=True)
        return {**key, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def verify(self, token: str, audience: str) -> dict[str, Any]:
        """The token's claims if it is signed by this mint, for `audience`, current and not revoked.

        Signature checks are cached per token string, so a repeated token costs two dict lookups.
        """
        try:
            claims = self._cache[token]
        except KeyError:
            claims = self._decode(token)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[token] = claims
        if claims is None:
            raise InvalidTokenError("malformed token or bad signature")
        if claims["aud"] != audience:
            raise InvalidTokenError(f"audience {claims['aud']!r} is not {audience!r}")
        now = time.time()
        if not claims["nbf"] <= now < claims["exp"]:
            raise InvalidTokenError("token is expired or not yet valid")
        if claims["jti"] in self._revoked:
            raise InvalidTokenError("token was revoked")
        return claims

    def _decode(self, token: str) -> dict[str, Any] | None:
        try:
            if jwt.get_unverified_header(token).get("kid") != self.kid:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public_key,
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            return None
        if not all(isinstance(claims.get(name), int) for name in ("nbf", "exp")):
            return None
        if not isinstance(claims.get("aud"), str) or not isinstance(claims.get("jti"), str):
            return None
        return claims

    def revoke_all(self) -> int:
        """Revoke every token issued so far by this mint; returns how many are newly revoked."""
        newly = len(self._issued - self._revoked)
        self._revoked |= self._issued
        return newly

    def stats(self) -> dict[str, Any]:
        """Issued and revoked counts, with issued tokens broken down by source, audience and principal."""
        return {
            "tokens_issued": sum(self._issued_by.values()),
            "tokens_revoked": len(self._revoked),
            "issued": [
                {"source": source, "audience": audience, "principal": principal, "count": count}
                for (source, audience, principal), count in sorted(self._issued_by.items())
            ],
        }

    def clear_stats(self) -> None:
        """Forget the per-source counts (issued and revoked token ids are kept: revocation stays)."""
        self._issued_by.clear()
