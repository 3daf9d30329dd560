"""`worker doctor`: one screen that says what works, what does not, and how to fix it.

Checks, in order (each later check needs the earlier ones):
1. settings      — endpoint, deployment, source, sink, auth mode; variables that would be ignored
2. credential    — which credential answered, for which principal (from the token's claims, never the token)
3. dns           — each endpoint's addresses; a private address means a private endpoint
4. tokens        — one token per scope (storage, Azure OpenAI)
5. source        — list (read) access
6. sink          — write and delete a probe
7. deployment    — one minimal call, with the quota headers it returned (each deployment of a pool)
Exit 0 when every check passes, 2 otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai

from worker.calls import error_code, error_message
from worker.errors import ConfigError, first_line
from worker.identity import (
    OPENAI_SCOPE,
    STORAGE_SCOPE,
    TokenEndpointUnavailable,
    describe_principal,
    token_claims,
)
from worker.pool import labels
from worker.services import Clients, ignored_variables, open_clients
from worker.settings import Settings, check_pool, describe
from worker.storage.urls import BlobLocation, Location, parse_location

OPENAI_ROLE = "Cognitive Services OpenAI User"
CREDENTIAL_FIXES = {
    "auto": "DefaultAzureCredential found no working credential; name the one you expect with --auth to see its own error",
    "managed-identity": "attach the identity to the job (or VM/app) and set AZURE_CLIENT_ID to the client id of the user-assigned identity (unset it for a system-assigned one)",
    "service-principal": "check AZURE_TENANT_ID, AZURE_CLIENT_ID and the secret or certificate (expired or rotated?)",
    "workload-identity": "check the service account's azure.workload.identity/client-id annotation, the pod label azure.workload.identity/use=true and the federated credential's issuer and subject",
    "azure-cli": "run `az login` (and `az account set --subscription ...`)",
    "interactive": "a browser must be able to open on this machine; AZURE_CLIENT_ID must allow public-client flows",
    "gcp-federation": "check the Entra app's federated credential: issuer https://accounts.google.com, subject = the Google service account's unique id, audience api://AzureADTokenExchange",
    "api-key": "storage still uses Entra ID in api-key mode: set AZURE_STORAGE_CONNECTION_STRING or make a credential available",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, ok: bool, detail: str, fix: str | None = None) -> bool:
        self.checks.append(Check(name, ok, detail, fix))
        return ok

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checks": [
                {"check": c.name, "ok": c.ok, "detail": c.detail, **({"fix": c.fix} if c.fix else {})}
                for c in self.checks
            ],
        }


class _CredentialNames(logging.Handler):
    """azure-identity logs which credential of a chain answered; that log line is the public way to know."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.answered: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "acquired a token from" in message:
            self.answered = message.rsplit("acquired a token from", 1)[1].strip()


def address_kind(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.is_loopback:
        return "loopback"
    if ip.is_private:
        return "private (a private endpoint)"
    return "public"


async def resolve(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def diagnose(settings: Settings) -> Report:
    """Run every check that the settings allow; never raises for configuration problems."""
    report = Report()
    locations = _check_settings(settings, report)
    handler = _CredentialNames()
    identity_logger = logging.getLogger("azure.identity")
    previous_level = identity_logger.level
    identity_logger.addHandler(handler)
    identity_logger.setLevel(logging.INFO)
    identity_logger.propagate = False
    try:
        async with open_clients(settings) as clients:
            await _check_dns(settings, locations, report)
            principal = await _check_tokens(settings, clients, locations, handler, report)
            if "source" in locations:
                await _guard(report, "source read", _check_source(clients, locations["source"], report))
            if "sink" in locations:
                await _guard(report, "sink write", _check_sink(clients, locations["sink"], principal, report))
            for check, name, endpoint in _deployments_to_call(settings):
                await _guard(
                    report, check, _check_deployment(clients, principal, report, check, name, endpoint)
                )
    except (ConfigError, TokenEndpointUnavailable) as error:
        report.add(
            "credential",
            False,
            str(error),
            CREDENTIAL_FIXES[settings.auth],
        )
    finally:
        identity_logger.removeHandler(handler)
        identity_logger.setLevel(previous_level)
        identity_logger.propagate = True
    return report


async def _guard(report: Report, name: str, check: Awaitable[None]) -> None:
    try:
        await check
    except ConfigError as error:
        report.add(name, False, str(error))
    except Exception as exc:  # noqa: BLE001 - the doctor reports every failure instead of stopping
        report.add(
            name, False, f"{type(exc).__name__}: {first_line(str(exc))}", "check the URL and the network path"
        )


def _deployments_to_call(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(check name, deployment name, endpoint) of each deployment to call: every one of the pool, else
    --deployment; none whose endpoint is unknown."""
    pool = settings.deployments
    if pool:
        return [
            (f"deployment {label}", entry.name, entry.endpoint)
            for label, entry in zip(labels(pool), pool, strict=True)
            if entry.endpoint or settings.endpoint
        ]
    if settings.endpoint and settings.deployment:
        return [("deployment call", settings.deployment, None)]
    return []


def _check_settings(settings: Settings, report: Report) -> dict[str, Location]:
    locations: dict[str, Location] = {}
    pool = settings.deployments
    if pool:
        entries = [
            f"{entry.name} (priority {entry.priority}, serves {entry.serves}"
            f"{', at ' + entry.endpoint if entry.endpoint else ''})"
            for entry in pool
        ]
        report.add("setting deployments", True, "; ".join(entries))
        try:
            check_pool(settings)
        except ConfigError as error:
            report.add("setting deployments", False, str(error))
    every_endpoint_named = bool(pool) and all(entry.endpoint for entry in pool)
    for name in ("endpoint", "deployment", "source", "sink"):
        value = getattr(settings, name)
        if not value:
            needed = name == "deployment" or (name == "endpoint" and not every_endpoint_named)
            report.add(f"setting {name}", not needed, "not set", f"set {describe(name)}" if needed else None)
            continue
        if name in ("source", "sink"):
            try:
                locations[name] = parse_location(value, what=f"--{name}")
            except ConfigError as error:
                report.add(f"setting {name}", False, str(error))
                continue
        report.add(f"setting {name}", True, str(value))
    report.add("setting auth", True, settings.auth)
    for variable in ignored_variables(settings):
        report.add(
            f"variable {variable}",
            False,
            "set, and ignored by the worker",
            f"unset {variable} to avoid confusion",
        )
    return locations


async def _check_dns(settings: Settings, locations: dict[str, Location], report: Report) -> None:
    endpoints = [settings.endpoint, *(entry.endpoint for entry in settings.deployments)]
    hosts = {urlsplit(endpoint).hostname for endpoint in endpoints if endpoint}
    hosts |= {
        urlsplit(loc.account_url).hostname for loc in locations.values() if isinstance(loc, BlobLocation)
    }
    for host in sorted(h for h in hosts if h):
        try:
            addresses = await resolve(host)
        except OSError as exc:
            report.add(
                f"dns {host}",
                False,
                f"does not resolve ({exc.strerror or exc})",
                "check the name, or the private DNS zone linked to this network",
            )
            continue
        kinds = ", ".join(f"{a} {address_kind(a)}" for a in addresses)
        report.add(f"dns {host}", True, kinds)


async def _check_tokens(
    settings: Settings,
    clients: Clients,
    locations: dict[str, Location],
    handler: _CredentialNames,
    report: Report,
) -> str:
    scopes = []
    if (
        any(isinstance(loc, BlobLocation) for loc in locations.values())
        and settings.storage_connection_string is None
    ):
        scopes.append(STORAGE_SCOPE)
    if clients.uses_entra_for_openai:
        scopes.append(OPENAI_SCOPE)
    principal = "the identity the worker runs as"
    for scope in scopes:
        token = await clients.tokens.token(scope)
        claims = token_claims(token.token)
        principal = describe_principal(token.token)
        minutes = int((token.expires_on - time.time()) / 60)
        report.add(
            f"token {scope}", True, f"for {principal}, audience {claims.get('aud', '?')}, valid {minutes} min"
        )
    if scopes:
        answered = handler.answered or type(clients.tokens.credential).__name__
        report.add("credential", True, f"{answered} (--auth {settings.auth})")
    return principal


async def _check_source(clients: Clients, location: Location, report: Report) -> None:
    count = 0
    async for _file in clients.source(location).list_files():
        count += 1
        if count >= 1000:
            break
    report.add("source read", True, f"{location}: {count}{'+' if count >= 1000 else ''} files listed")


async def _check_sink(clients: Clients, location: Location, principal: str, report: Report) -> None:
    try:
        await clients.sink(location).prepare()
    except ConfigError as error:
        report.add("sink write", False, str(error), f"assign 'Storage Blob Data Contributor' to {principal}")
        return
    report.add("sink write", True, f"{location}: a probe was written and deleted")


async def _check_deployment(
    clients: Clients, principal: str, report: Report, check: str, name: str, endpoint: str | None
) -> None:
    """One minimal call to deployment `name` at `endpoint` (None: AZURE_OPENAI_ENDPOINT)."""
    started = time.perf_counter()
    body = {"model": name, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    where = "AZURE_OPENAI_ENDPOINT" if endpoint is None else f"the entry's endpoint ({endpoint})"
    try:
        response = await clients.openai_for(endpoint).post(
            "/chat/completions", cast_to=httpx2.Response, body=body
        )
    except openai.APIStatusError as exc:
        code = error_code(exc)
        fix = {
            401: f"the token was rejected: check {where} is the resource {principal} belongs with",
            403: f"assign '{OPENAI_ROLE}' on the Azure OpenAI resource at {where} to {principal}",
            404: (
                "set AZURE_OPENAI_DEPLOYMENT to a deployment name of this resource (not the model name)"
                if check == "deployment call"
                else f"set the [[deployments]] entry's name to a deployment name at {where} (not the model name)"
            ),
            429: "the deployment is at its quota right now; that is not a configuration error",
        }.get(exc.status_code)
        report.add(check, exc.status_code == 429, f"{name}: {code}: {error_message(exc)}", fix)
        return
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        report.add(check, False, error_message(exc), f"check {where} and the network path")
        return
    took = (time.perf_counter() - started) * 1000
    quota = ", ".join(
        f"{header.removeprefix('x-ratelimit-')}={response.headers[header]}"
        for header in ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens")
        if header in response.headers
    )
    report.add(
        check, True, f"{name}: HTTP {response.status_code} in {took:.0f} ms{'; ' + quota if quota else ''}"
    )


def render(report: Report) -> str:
    lines = []
    for check in report.checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"{mark}  {check.name:<34} {check.detail}")
        if check.fix and not check.ok:
            lines.append(f"      {'':<34} fix: {check.fix}")
    verdict = "all checks passed" if report.ok else f"{sum(not c.ok for c in report.checks)} check(s) failed"
    lines.append(verdict)
    return "\n".join(lines)
