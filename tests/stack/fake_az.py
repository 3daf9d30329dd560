"""A stand-in for the Azure CLI, enough for azure-identity's AzureCliCredential (standard library only).

Installed by `scripts.write_fake_az` as `<workdir>/bin/az`, a launcher that calls `main(CONFIG, argv)`.
Supported: `az account get-access-token [--output json|tsv] (--resource R | --scope S...) [--tenant T]
[--subscription S]`, `az account show`, `az login`, `az logout`, `az version`. Tokens are minted by the
identity server's admin API (`POST /_admin/az-token`), for the directory's user through the Azure CLI's
client id. While the marker file `<state_dir>/logged-out` exists every token command fails like the real
CLI does after `az logout`: `ERROR: Please run 'az login' to setup account.` on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

LOGGED_OUT_MARKER = "logged-out"
NOT_LOGGED_IN = "ERROR: Please run 'az login' to setup account.\n"
DEFAULT_RESOURCE = "https://management.core.windows.net/"
TIMEOUT_S = 10.0


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(message if message.endswith("\n") else message + "\n")
    return code


def _account(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "environmentName": "AzureCloud",
        "homeTenantId": config["tenant_id"],
        "id": config["subscription_id"],
        "isDefault": True,
        "managedByTenants": [],
        "name": "local-stack",
        "state": "Enabled",
        "tenantId": config["tenant_id"],
        "user": {"name": config["upn"], "type": "user"},
    }


def _get_access_token(config: dict[str, Any], argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="az account get-access-token")
    parser.add_argument("--output", "-o", default="json", choices=["json", "jsonc", "tsv", "none"])
    parser.add_argument("--resource")
    parser.add_argument("--scope", nargs="+")
    parser.add_argument("--resource-type")
    parser.add_argument("--tenant", "-t")
    parser.add_argument("--subscription", "-s")
    parser.add_argument("--query")
    args = parser.parse_args(argv)
    if args.resource and args.scope:
        return _fail("ERROR: usage error: --resource/--resource-type/--scope are mutually exclusive")
    resource = args.scope[0].removesuffix("/.default") if args.scope else args.resource or DEFAULT_RESOURCE
    request = urllib.request.Request(
        config["admin_url"] + "/_admin/az-token",
        data=json.dumps({"resource": resource, "tenant": args.tenant}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT_S) as response:
            token = json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            detail = json.loads(error.read() or b"{}").get("error", f"HTTP {error.code}")
        return _fail(f"ERROR: {detail}")
    except OSError as error:
        return _fail(f"ERROR: Failed to connect to the identity endpoint: {error}")
    expires_on = int(token["expires_on"])
    result = {
        "accessToken": token["accessToken"],
        "expiresOn": datetime.datetime.fromtimestamp(expires_on).strftime("%Y-%m-%d %H:%M:%S.%f"),
        "expires_on": expires_on,
        "subscription": args.subscription or token["subscription"],
        "tenant": token["tenant"],
        "tokenType": token["tokenType"],
    }
    if args.output == "tsv":
        sys.stdout.write("\t".join(str(value) for value in result.values()) + "\n")
    elif args.output != "none":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def main(config: dict[str, Any], argv: list[str]) -> int:
    """Run one `az` command line; returns the exit code."""
    state_dir = Path(config["state_dir"])
    marker = state_dir / LOGGED_OUT_MARKER
    command = [arg for arg in argv[:2] if not arg.startswith("-")]
    if argv[:1] in (["version"], ["--version"]):
        sys.stdout.write(json.dumps({"azure-cli": "2.99.0-local-stack", "extensions": {}}, indent=2) + "\n")
        return 0
    if command[:1] == ["login"]:
        marker.unlink(missing_ok=True)
        sys.stdout.write(json.dumps([_account(config)], indent=2) + "\n")
        return 0
    if command[:1] == ["logout"]:
        state_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        return 0
    if command == ["account", "show"]:
        if marker.exists():
            return _fail(NOT_LOGGED_IN)
        sys.stdout.write(json.dumps(_account(config), indent=2) + "\n")
        return 0
    if command == ["account", "get-access-token"]:
        if marker.exists():
            return _fail(NOT_LOGGED_IN)
        return _get_access_token(config, argv[2:])
    return _fail(f"ERROR: '{' '.join(argv)}' is misspelled or not recognized by the system.", 2)
