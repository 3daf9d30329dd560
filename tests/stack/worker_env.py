"""Environments for a `worker` subprocess pointed at the local stack, one builder per auth mode."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

STRIPPED_PREFIXES = ("AZURE_", "OPENAI_", "IDENTITY_", "MSI_")
"""Variables with these prefixes are removed from the inherited environment so nothing leaks in."""


@dataclass(frozen=True)
class StackEndpoints:
    """What a worker needs to know about the running stack."""

    ca_file: Path
    openai_endpoint: str
    deployment: str
    api_version: str
    identity_endpoint: str
    identity_header: str
    user_assigned_client_id: str
    openai_api_key: str


def _managed_identity(stack: StackEndpoints) -> dict[str, str]:
    """User-assigned managed identity, as on Container Apps with an identity attached."""
    return {**_system_assigned(stack), "AZURE_CLIENT_ID": stack.user_assigned_client_id}


def _system_assigned(stack: StackEndpoints) -> dict[str, str]:
    """System-assigned managed identity: the MSI endpoint without AZURE_CLIENT_ID."""
    return {
        "IDENTITY_ENDPOINT": stack.identity_endpoint,
        "IDENTITY_HEADER": stack.identity_header,
        "WORKER_AUTH": "managed-identity",
    }


def _api_key(stack: StackEndpoints) -> dict[str, str]:
    """A static Azure OpenAI key (the worker's opt-out of Entra ID)."""
    return {"AZURE_OPENAI_API_KEY": stack.openai_api_key, "WORKER_AUTH": "api-key"}


AUTH_MODES: dict[str, Callable[[StackEndpoints], dict[str, str]]] = {
    "managed-identity": _managed_identity,
    "managed-identity-system": _system_assigned,
    "api-key": _api_key,
}
"""Auth mode -> the variables it adds. New modes (service principal, workload identity...) go here."""


def worker_env(
    stack: StackEndpoints, auth: str = "managed-identity", *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`environ` (default os.environ) without Azure/OpenAI/identity variables, plus the stack's settings."""
    try:
        auth_variables = AUTH_MODES[auth]
    except KeyError:
        raise ValueError(f"unknown auth mode {auth!r}; known: {', '.join(AUTH_MODES)}") from None
    source = os.environ if environ is None else environ
    env = {name: value for name, value in source.items() if not name.startswith(STRIPPED_PREFIXES)}
    env.update(
        {
            "SSL_CERT_FILE": str(stack.ca_file),
            "REQUESTS_CA_BUNDLE": str(stack.ca_file),
            "AZURE_OPENAI_ENDPOINT": stack.openai_endpoint,
            "OPENAI_API_VERSION": stack.api_version,
            "AZURE_OPENAI_DEPLOYMENT": stack.deployment,
        }
    )
    env.update(auth_variables(stack))
    return env
