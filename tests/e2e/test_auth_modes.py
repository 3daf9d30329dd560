"""Every authentication mode, end to end through the worker CLI and the real azure-identity,
against stand-ins that speak the real protocols. Nothing a run writes contains a token or a secret."""

from __future__ import annotations

import json

import pytest

from tests.e2e.helpers import (
    Run,
    answer_text,
    batch_line,
    new_container,
    results,
    run_revoking_tokens_mid_run,
    run_worker,
    upload,
)
from tests.stack import LocalStack

# mode → (what issued the tokens, the principal the stand-in recorded, the worker's --auth value)
MODES: dict[str, tuple[str, str]] = {
    "managed-identity": ("msi", "user-assigned"),
    "managed-identity-system": ("msi", "system-assigned"),
    "service-principal": ("entra", "sp-secret"),
    "service-principal-cert": ("entra", "sp-cert"),
    "workload-identity": ("entra", "workload-identity"),
    "gcp-federation": ("entra", "gcp-federation"),
    "azure-cli": ("az-cli", "user:developer@local-stack.test"),
    "interactive": ("entra", "user:developer@local-stack.test"),
    "auto-sp": ("entra", "sp-secret"),
    "api-key": ("msi", "user-assigned"),
}

JWT_PREFIX = "eyJ"  # every JWT (access token, assertion, id token) starts with a base64url '{"'


def inputs() -> dict[str, bytes]:
    return {
        "a.txt": b"mode text",
        "b.json": json.dumps({"messages": [{"role": "user", "content": "mode json"}]}).encode(),
        "c.jsonl": batch_line("c1", "mode line 1") + b"\n" + batch_line("c2", "mode line 2") + b"\n",
    }


def secrets_of(stack: LocalStack, env: dict[str, str]) -> list[str]:
    values = [stack.identity_header, stack.openai_api_key, stack.sp_client_secret]
    if "AZURE_CLIENT_CERTIFICATE_PATH" in env:
        with open(env["AZURE_CLIENT_CERTIFICATE_PATH"]) as file:
            pem = file.read()
        key = pem.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END")[0]
        values += [line for line in key.splitlines() if len(line) > 40][:3]
    return [value for value in values if value]


def everything_written(stack: LocalStack, run: Run, sink: str) -> str:
    client = stack.blob_service().get_container_client(sink)
    blobs = [client.download_blob(blob.name).readall().decode() for blob in client.list_blobs()]
    return "\n".join([run.stdout, run.stderr, *blobs])


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_runs_end_to_end_and_leaks_nothing(stack: LocalStack, mode: str) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, inputs())
    env = stack.worker_env(mode)

    run = run_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink), auth=mode)

    assert run.code == 0, run.stdout[-3000:] + run.stderr[-2000:]
    by_id = {record["custom_id"]: record for record in results(stack, sink)}
    assert {k: answer_text(v) for k, v in by_id.items()} == {
        "a.txt": "ECHO: mode text",
        "b.json": "ECHO: mode json",
        "c1": "ECHO: mode line 1",
        "c2": "ECHO: mode line 2",
    }
    source_kind, principal = MODES[mode]
    issued = stack.identity.stats()["issued"]
    assert {(entry["source"], entry["principal"]) for entry in issued} == {(source_kind, principal)}
    audiences = {entry["audience"] for entry in issued}
    expected_audiences = {"https://storage.azure.com"} | (
        set() if mode == "api-key" else {"https://cognitiveservices.azure.com"}
    )
    assert audiences == expected_audiences
    assert sum(entry["count"] for entry in issued) == len(expected_audiences)  # one token per scope, shared
    openai_auth = stack.openai.stats()["by_auth"]
    assert openai_auth == ({"api-key": 4} if mode == "api-key" else {"bearer": 4})

    written = everything_written(stack, run, sink)
    assert JWT_PREFIX not in written
    for secret in secrets_of(stack, env):
        assert secret not in written


def test_service_principal_token_revoked_mid_run_is_refreshed_with_a_claims_request(
    stack: LocalStack,
) -> None:
    run, _ = run_revoking_tokens_mid_run(stack, auth="service-principal", items=120)

    assert run.code == 0
    assert (run.summary["succeeded"], run.summary["token_refreshes"]) == (120, 1)
    entra = stack.identity.stats()["entra"]
    assert (
        entra["claims_requests"] == 1
    )  # the fresh token came from a claims challenge, past the credential's cache
    assert sum(r["count"] for r in entra["token_requests"]) <= 3


def test_wrong_client_secret_exits_2_with_the_aadsts_reason_and_no_secret(stack: LocalStack) -> None:
    wrong = "definitely-not-the-secret-0123456789"
    run = run_worker(
        stack,
        "--source",
        stack.blob_url("whatever"),
        "--sink",
        stack.blob_url("whatever2"),
        auth="service-principal",
        env={"AZURE_CLIENT_SECRET": wrong},
    )
    assert run.code == 2
    assert "AADSTS7000215" in run.summary["error"]
    assert wrong not in run.stdout + run.stderr


def test_azure_cli_logged_out_says_to_run_az_login(stack: LocalStack) -> None:
    stack.az_logout()
    try:
        run = run_worker(
            stack,
            "--source",
            stack.blob_url("whatever"),
            "--sink",
            stack.blob_url("whatever2"),
            auth="azure-cli",
        )
    finally:
        stack.az_login()
    assert run.code == 2
    assert "az login" in run.summary["error"]


def test_missing_service_principal_variables_are_named(stack: LocalStack) -> None:
    run = run_worker(
        stack,
        "--source",
        stack.blob_url("whatever"),
        "--sink",
        stack.blob_url("whatever2"),
        auth="service-principal",
        env={"AZURE_CLIENT_SECRET": "", "AZURE_CLIENT_CERTIFICATE_PATH": ""},
    )
    assert run.code == 2
    assert "AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH" in run.summary["error"]


def test_a_static_token_in_the_environment_is_ignored_with_a_warning(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"a.txt": b"static"})
    run = run_worker(
        stack,
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink),
        env={"AZURE_OPENAI_AD_TOKEN": "a-static-token-that-would-expire"},
    )
    assert run.code == 0
    warnings = [e for e in run.events if e["event"] == "config.ignored_variable"]
    assert [w["variable"] for w in warnings] == ["AZURE_OPENAI_AD_TOKEN"]
    assert "a-static-token-that-would-expire" not in run.stdout + run.stderr
    assert stack.openai.stats()["by_status"] == {
        "200": 1
    }  # the managed identity's token was used, and accepted
