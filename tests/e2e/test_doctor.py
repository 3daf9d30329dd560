"""`worker doctor`: one screen, every failure with its fix, exit 0 only when all pass."""

from __future__ import annotations

import json
import subprocess

from tests.e2e.helpers import WORKER, new_container
from tests.stack import LocalStack


def doctor(
    stack: LocalStack, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**stack.worker_env(), **(env or {})}
    return subprocess.run(
        [WORKER, "doctor", *args], env=environment, capture_output=True, text=True, timeout=120, check=False
    )


def test_doctor_passes_and_names_the_principal(stack: LocalStack) -> None:
    source = new_container(stack, "src")
    done = doctor(
        stack, "--source", stack.blob_url(source), "--sink", stack.blob_url("doctorsink", "probe/"), "--json"
    )

    assert done.returncode == 0, done.stdout
    report = json.loads(done.stdout)
    checks = {check["check"]: check for check in report["checks"]}
    assert report["ok"] is True
    assert "ManagedIdentityCredential" in checks["credential"]["detail"]
    assert (
        f"(app {stack.user_assigned_client_id})"
        in checks["token https://cognitiveservices.azure.com/.default"]["detail"]
    )
    assert "loopback" in checks["dns 127.0.0.1"]["detail"]
    assert checks["sink write"]["ok"] and checks["source read"]["ok"]
    assert "HTTP 200" in checks["deployment call"]["detail"]
    assert "eyJ" not in done.stdout + done.stderr  # no token ever printed


def test_doctor_explains_a_wrong_identity_and_a_wrong_deployment(stack: LocalStack) -> None:
    done = doctor(stack, env={"AZURE_CLIENT_ID": "00000000-0000-0000-0000-00000000beef"})
    assert done.returncode == 2
    assert "Unable to load the proper Managed Identity" in done.stdout
    assert "fix: attach the identity" in done.stdout

    done = doctor(stack, "--deployment", "gpt-4o-typo")
    assert done.returncode == 2
    assert "FAIL  deployment call" in done.stdout
    assert "DeploymentNotFound" in done.stdout
    assert "not the model name" in done.stdout


def test_doctor_flags_ignored_secrets_and_missing_settings(stack: LocalStack) -> None:
    done = doctor(stack, env={"AZURE_OPENAI_AD_TOKEN": "static-token-value", "AZURE_OPENAI_ENDPOINT": ""})
    assert done.returncode == 2
    assert "variable AZURE_OPENAI_AD_TOKEN" in done.stdout
    assert "static-token-value" not in done.stdout + done.stderr
    assert "setting endpoint" in done.stdout and "AZURE_OPENAI_ENDPOINT" in done.stdout
