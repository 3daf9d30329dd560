"""Synchronous clients for the fakes' admin APIs (`/_admin/...`), used from tests and scripts."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

ADMIN_TIMEOUT_S = 10.0
"""Timeout of one admin call, in seconds."""

# Bypass any HTTP(S)_PROXY from the environment: the stack is on 127.0.0.1.
_OPENER_HANDLERS: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]


class AdminError(RuntimeError):
    """An admin call was refused (e.g. an unknown setting); the message carries the server's answer."""


class _AdminClient:
    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        handlers = [*_OPENER_HANDLERS]
        if ssl_context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=ssl_context))
        self._opener = urllib.request.build_opener(*handlers)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/_admin/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with self._opener.open(request, timeout=ADMIN_TIMEOUT_S) as response:
                result: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                detail = error.read().decode(errors="replace")
            raise AdminError(f"{method} {request.full_url} -> {error.code}: {detail}") from None
        return result

    def stats(self) -> dict[str, Any]:
        """The server's counters (see the server module for the keys)."""
        return self._call("GET", "stats")

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Merge `settings` into the server's config; returns the whole config after the change."""
        return self._call("POST", "config", settings)

    def reset(self) -> dict[str, Any]:
        """Back to the start-up config, counters cleared; returns the config."""
        return self._call("POST", "reset", {})


class OpenAIAdmin(_AdminClient):
    """Admin client of the fake Azure OpenAI."""

    def config(self) -> dict[str, Any]:
        """The current config (force_* counters show how many forced faults are left)."""
        return self._call("GET", "config")

    def batches(self) -> dict[str, Any]:
        """The Batch API's state: config, stats, by_status and every batch (moved along its clock)."""
        return self._call("GET", "batches")

    def configure_batches(self, **settings: Any) -> dict[str, Any]:
        """Merge `settings` into the Batch API's config (see tests/stack/openai_batches.py)."""
        return self._call("POST", "batches", settings)


class IdentityAdmin(_AdminClient):
    """Admin client of the identity server."""

    def revoke_all(self) -> None:
        """Revoke every token issued so far (they then fail verification at the fake Azure OpenAI)."""
        self._call("POST", "revoke", {})
