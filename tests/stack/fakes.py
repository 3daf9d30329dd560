"""The fakes process: identity server (HTTP) and Azure OpenAI (HTTPS) sharing one token mint.

    python -m tests.stack.fakes --tls-dir DIR --state-dir STATE --ready-file FILE [--config JSON]

Servers: identity (HTTP: managed identity + admin API), Azure OpenAI (HTTPS), Entra authority (HTTPS),
GCE metadata (HTTP). DIR must hold ca.pem, server.pem and server.key (see certs.py); the RSA signing key is
written there too (signing-key.pem) so the parent can mint storage tokens with the same key. STATE receives
the fake tenant's secrets (sp_cert.pem, the external issuers' keys; see directory.py). --config is a JSON object
{"openai": {...}, "identity": {...}} of initial settings. Once every server listens, FILE is written
atomically with the ports and generated ids; the process then serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from .certs import TlsFiles, server_ssl_context
from .directory import EntraDirectory
from .identity import FakeIdentity, IdentityConfig, ManagedIdentities
from .openai_fake import FakeAzureOpenAI, OpenAIConfig
from .settings import merge
from .tokens import TokenMint

HOST = "127.0.0.1"
SHUTDOWN_TIMEOUT_S = 0.5
"""How long in-flight requests (e.g. deliberately hanging ones) may delay shutdown, in seconds."""
SIGNING_KEY_FILE = "signing-key.pem"
CONFIG_SECTIONS = frozenset({"openai", "identity"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m tests.stack.fakes", description=__doc__)
    parser.add_argument(
        "--tls-dir", type=Path, required=True, help="directory with ca.pem/server.pem/server.key"
    )
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="directory for the tenant's secret files"
    )
    parser.add_argument("--ready-file", type=Path, required=True, help="JSON file written once listening")
    parser.add_argument("--config", type=json.loads, default={}, help='{"openai": {...}, "identity": {...}}')
    return parser.parse_args(argv)


@contextlib.asynccontextmanager
async def _serving(app: web.Application, ssl_context: ssl.SSLContext | None) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1 at an OS-chosen port; yields the port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context, backlog=1024)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


async def serve(tls_dir: Path, state_dir: Path, ready_file: Path, config: dict[str, Any]) -> None:
    """Run every fake until SIGTERM/SIGINT, announcing the ports in `ready_file`."""
    unknown = set(config) - CONFIG_SECTIONS
    if unknown:
        raise SystemExit(f"unknown config sections {sorted(unknown)}; known: {sorted(CONFIG_SECTIONS)}")
    tls = TlsFiles.in_dir(tls_dir)
    if not tls.exist():
        raise SystemExit(f"{tls_dir} lacks ca.pem, server.pem or server.key")
    mint = TokenMint(str(uuid.uuid4()))
    signing_key_file = tls_dir / SIGNING_KEY_FILE
    mint.write_private_key(signing_key_file)
    identities = ManagedIdentities.new()
    directory = EntraDirectory.new(state_dir, mint.tenant_id)
    identity = FakeIdentity(mint, identities, merge(IdentityConfig(), config.get("identity", {})), directory)
    openai_config = merge(OpenAIConfig(api_key=secrets.token_hex(16)), config.get("openai", {}))
    openai = FakeAzureOpenAI(mint, openai_config)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        _serving(identity.app(), None) as identity_port,
        _serving(openai.app(), server_ssl_context(tls)) as openai_port,
        _serving(identity.entra.app(), server_ssl_context(tls)) as authority_port,
        _serving(identity.gce.app(), None) as gce_metadata_port,
    ):
        _write_atomically(
            ready_file,
            {
                "pid": os.getpid(),
                "identity_port": identity_port,
                "openai_port": openai_port,
                "authority_port": authority_port,
                "gce_metadata_port": gce_metadata_port,
                "tenant_id": mint.tenant_id,
                "signing_key_file": str(signing_key_file),
                "kid": mint.kid,
                "openai_api_key": openai_config.api_key,
                **identities.as_json(),
                "entra": directory.as_json(),
            },
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m tests.stack.fakes`."""
    args = parse_args(argv)
    asyncio.run(serve(args.tls_dir, args.state_dir, args.ready_file, args.config))


if __name__ == "__main__":
    main()
