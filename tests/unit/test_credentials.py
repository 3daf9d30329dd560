"""build_credential: the --auth mode and the identity settings (read from the environment by load_settings)
make one azure-identity credential; what a mode lacks is a configuration error naming the variable."""

from __future__ import annotations

import pytest
from azure.identity import aio

from worker.errors import ConfigError
from worker.identity import SyncCredentialInThread, build_credential
from worker.settings import load_settings

APP = {"AZURE_TENANT_ID": "tenant-id", "AZURE_CLIENT_ID": "app-id"}


@pytest.mark.parametrize(
    ("auth", "environ", "kind"),
    [
        ("auto", {}, aio.DefaultAzureCredential),
        ("api-key", {}, aio.DefaultAzureCredential),
        ("managed-identity", {"AZURE_CLIENT_ID": "app-id"}, aio.ManagedIdentityCredential),
        ("service-principal", {**APP, "AZURE_CLIENT_SECRET": "s3cret"}, aio.ClientSecretCredential),
        (
            "workload-identity",
            {**APP, "AZURE_FEDERATED_TOKEN_FILE": "/token"},
            aio.WorkloadIdentityCredential,
        ),
        ("gcp-federation", {**APP, "GCE_METADATA_HOST": "127.0.0.1:9"}, aio.ClientAssertionCredential),
        ("azure-cli", {}, aio.AzureCliCredential),
        ("interactive", {}, SyncCredentialInThread),
    ],
)
async def test_each_mode_gets_its_credential(auth: str, environ: dict[str, str], kind: type) -> None:
    credential = build_credential(load_settings({"auth": auth}, environ))
    try:
        assert isinstance(credential, kind)
    finally:
        await credential.close()


@pytest.mark.parametrize(
    ("auth", "environ", "message"),
    [
        (
            "service-principal",
            {},
            "--auth service-principal needs AZURE_TENANT_ID, AZURE_CLIENT_ID in the environment",
        ),
        ("service-principal", APP, "needs AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH"),
        (
            "workload-identity",
            APP,
            "--auth workload-identity needs AZURE_FEDERATED_TOKEN_FILE in the environment",
        ),
        ("gcp-federation", {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": ""}, "needs AZURE_CLIENT_ID in the"),
    ],
)
def test_what_a_mode_lacks_is_named(auth: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_credential(load_settings({"auth": auth}, environ))
