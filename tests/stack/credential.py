"""A synchronous azure-core token credential that signs tokens with the stack's mint (no HTTP)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

from .tokens import Principal, TokenMint, audience_of


class MintCredential:
    """TokenCredential and SupportsTokenInfo for test code: tokens for any scope, from `mint`."""

    def __init__(self, mint: TokenMint, principal: Principal, *, source: str = "test-credential") -> None:
        self._mint = mint
        self._principal = principal
        self._source = source

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """A fresh token for the first scope (e.g. "https://storage.azure.com/.default")."""
        info = self.get_token_info(*scopes)
        return AccessToken(info.token, info.expires_on)

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        """A fresh token for the first scope, with its expiry (epoch seconds)."""
        if not scopes:
            raise ValueError("at least one scope is required")
        issued = self._mint.mint(audience_of(scopes[0]), self._principal, source=self._source)
        return AccessTokenInfo(issued.token, issued.expires_on)

    def close(self) -> None:
        """Nothing to release."""

    def __enter__(self) -> MintCredential:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
