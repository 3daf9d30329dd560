"""Environments for a `worker` subprocess pointed at the local stack, one builder per auth mode."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

STRIPPED_PREFIXES = ("AZURE_", "OPENAI_", "IDENTITY_", "MSI_", "GCE_METADATA_", "GOOGLE_")
"""Variables with these prefixes are removed from the inherited environment so nothing leaks in."""
STRIPPED_NAMES = frozenset({"BROWSER", "IMDS_ENDPOINT"})
"""Single variables removed likewise (BROWSER: never open a real browser from a test)."""


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
    tenant_id: str
    authority_host: str
    sp_client_id: str
    sp_client_secret: str
    sp_cert_client_id: str
    sp_cert_path: Path
    workload_client_id: str
    federated_token_file: Path
    gcp_client_id: str
    gce_metadata_host: str
    interactive_client_id: str
    az_bin_dir: Path
    browser: Path


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
    """A static Azure OpenAI key; storage still needs Entra (DefaultAzureCredential -> the managed identity)."""
    return {
        **_managed_identity(stack),
        "AZURE_OPENAI_API_KEY": stack.openai_api_key,
        "WORKER_AUTH": "api-key",
    }


def _authority(stack: StackEndpoints, client_id: str) -> dict[str, str]:
    return {
        "AZURE_TENANT_ID": stack.tenant_id,
        "AZURE_CLIENT_ID": client_id,
        "AZURE_AUTHORITY_HOST": stack.authority_host,
    }


def _service_principal(stack: StackEndpoints) -> dict[str, str]:
    """An app registration with a client secret (ClientSecretCredential)."""
    return {
        **_authority(stack, stack.sp_client_id),
        "AZURE_CLIENT_SECRET": stack.sp_client_secret,
        "WORKER_AUTH": "service-principal",
    }


def _service_principal_cert(stack: StackEndpoints) -> dict[str, str]:
    """An app registration with a certificate (CertificateCredential, PEM with key + certificate)."""
    return {
        **_authority(stack, stack.sp_cert_client_id),
        "AZURE_CLIENT_CERTIFICATE_PATH": str(stack.sp_cert_path),
        "WORKER_AUTH": "service-principal",
    }


def _workload_identity(stack: StackEndpoints) -> dict[str, str]:
    """AKS workload identity: a projected service-account token federated with an app."""
    return {
        **_authority(stack, stack.workload_client_id),
        "AZURE_FEDERATED_TOKEN_FILE": str(stack.federated_token_file),
        "WORKER_AUTH": "workload-identity",
    }


def _gcp_federation(stack: StackEndpoints) -> dict[str, str]:
    """Google ID token from the (fake) GCE metadata server, exchanged through a federated credential."""
    return {
        **_authority(stack, stack.gcp_client_id),
        "GCE_METADATA_HOST": stack.gce_metadata_host,
        "WORKER_AUTH": "gcp-federation",
    }


def _azure_cli(stack: StackEndpoints, environ: Mapping[str, str]) -> dict[str, str]:
    """The fake `az` first on PATH (signed in as the directory's user unless `stack.az_logout()`)."""
    path = environ.get("PATH", os.defpath)
    return {"PATH": f"{stack.az_bin_dir}{os.pathsep}{path}", "WORKER_AUTH": "azure-cli"}


def _interactive(stack: StackEndpoints) -> dict[str, str]:
    """InteractiveBrowserCredential with the scripted browser and the public client app."""
    return {
        **_authority(stack, stack.interactive_client_id),
        "BROWSER": str(stack.browser),
        "WORKER_AUTH": "interactive",
    }


def _auto_service_principal(stack: StackEndpoints) -> dict[str, str]:
    """DefaultAzureCredential finding the service principal through EnvironmentCredential."""
    return {**_service_principal(stack), "WORKER_AUTH": "auto"}


AUTH_MODES: dict[str, Callable[[StackEndpoints, Mapping[str, str]], dict[str, str]]] = {
    "managed-identity": lambda stack, _: _managed_identity(stack),
    "managed-identity-system": lambda stack, _: _system_assigned(stack),
    "api-key": lambda stack, _: _api_key(stack),
    "service-principal": lambda stack, _: _service_principal(stack),
    "service-principal-cert": lambda stack, _: _service_principal_cert(stack),
    "workload-identity": lambda stack, _: _workload_identity(stack),
    "gcp-federation": lambda stack, _: _gcp_federation(stack),
    "azure-cli": _azure_cli,
    "interactive": lambda stack, _: _interactive(stack),
    "auto-sp": lambda stack, _: _auto_service_principal(stack),
}
"""Auth mode -> the variables it adds (given the stack and the inherited environment)."""


def worker_env(
    stack: StackEndpoints, auth: str = "managed-identity", *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`environ` (default os.environ) without Azure/OpenAI/identity variables, plus the stack's settings."""
    try:
        auth_variables = AUTH_MODES[auth]
    except KeyError:
        raise ValueError(f"unknown auth mode {auth!r}; known: {', '.join(AUTH_MODES)}") from None
    source = os.environ if environ is None else environ
    env = {
        name: value
        for name, value in source.items()
        if not name.startswith(STRIPPED_PREFIXES) and name not in STRIPPED_NAMES
    }
    env.update(
        {
            "SSL_CERT_FILE": str(stack.ca_file),
            "REQUESTS_CA_BUNDLE": str(stack.ca_file),
            "AZURE_OPENAI_ENDPOINT": stack.openai_endpoint,
            "OPENAI_API_VERSION": stack.api_version,
            "AZURE_OPENAI_DEPLOYMENT": stack.deployment,
        }
    )
    env.update(auth_variables(stack, source))
    return env
