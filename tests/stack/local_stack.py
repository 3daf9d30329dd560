"""`LocalStack`: Azurite + the fakes process as one context manager for tests, the demo and the bench."""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import sys
import time
import urllib.parse
from pathlib import Path
from types import TracebackType
from typing import Any

from azure.storage.blob import BlobServiceClient

from .admin import IdentityAdmin, OpenAIAdmin
from .azurite import Azurite
from .certs import TlsFiles, client_ssl_context, write_tls_files
from .credential import MintCredential
from .procs import ManagedProcess
from .tokens import Principal, TokenMint
from .worker_env import StackEndpoints, worker_env

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEPLOYMENT = "gpt-4o-mini"
DEFAULT_API_VERSION = "2024-10-21"
HOST = "127.0.0.1"


class LocalStack:
    """Azurite over HTTPS with OAuth, a fake managed-identity endpoint and a fake Azure OpenAI.

    Everything runs on 127.0.0.1 under `workdir` (certificates in tls/, Azurite data in azurite/, process
    output in logs/). Azurite's data is wiped on start; it survives `restart_azurite()`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        openai: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        deployment: str = DEFAULT_DEPLOYMENT,
        api_version: str = DEFAULT_API_VERSION,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.deployment = deployment
        self.api_version = api_version
        self._initial_config = {"openai": openai or {}, "identity": identity or {}}
        self._exit_stack = contextlib.ExitStack()
        self._azurite: Azurite | None = None
        self._ready: dict[str, Any] = {}
        self._mint: TokenMint | None = None
        self._tls: TlsFiles | None = None
        self._openai_admin: OpenAIAdmin | None = None
        self._identity_admin: IdentityAdmin | None = None
        self.startup_seconds = 0.0
        """Wall-clock time `start()` took, in seconds."""

    # ---- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start Azurite and the fakes; on any failure stop whatever did start and re-raise."""
        started = time.monotonic()
        with contextlib.ExitStack() as cleanup:
            self.workdir.mkdir(parents=True, exist_ok=True)
            tls = write_tls_files(self.workdir / "tls")
            self._tls = tls
            log_dir = self.workdir / "logs"
            ready_file = self.workdir / "fakes-ready.json"
            ready_file.unlink(missing_ok=True)
            fakes = ManagedProcess(
                "fakes",
                [
                    sys.executable, "-m", "tests.stack.fakes",
                    "--tls-dir", str(tls.ca.parent),
                    "--ready-file", str(ready_file),
                    "--config", json.dumps(self._initial_config),
                ],
                log_dir=log_dir,
                cwd=REPO_ROOT,
            )  # fmt: skip
            cleanup.callback(fakes.stop)
            azurite_data = self.workdir / "azurite"
            shutil.rmtree(azurite_data, ignore_errors=True)
            azurite = Azurite(repo_root=REPO_ROOT, tls=tls, location=azurite_data, log_dir=log_dir)
            cleanup.callback(azurite.stop)
            azurite.start()
            fakes.wait_ready(ready_file.exists, what="writing its ready file")
            self._ready = json.loads(ready_file.read_text())
            self._azurite = azurite
            self._mint = TokenMint.from_pem_file(
                Path(self._ready["signing_key_file"]), self._ready["tenant_id"]
            )
            self._openai_admin = OpenAIAdmin(self.openai_endpoint, self.ssl_context())
            self._identity_admin = IdentityAdmin(f"http://{HOST}:{self._ready['identity_port']}")
            self._exit_stack = cleanup.pop_all()
        self.startup_seconds = time.monotonic() - started

    def close(self) -> None:
        """Stop every process of the stack (idempotent)."""
        self._exit_stack.close()
        self._azurite = None

    # ---- connection facts -------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA that signed every TLS endpoint of the stack."""
        if self._tls is None:
            raise RuntimeError("the stack is not started")
        return self._tls.ca

    def ssl_context(self) -> ssl.SSLContext:
        """A new client TLS context trusting the stack's CA."""
        return client_ssl_context(self.ca_file)

    @property
    def account_url(self) -> str:
        """Blob account URL, path-style: https://127.0.0.1:<port>/devstoreaccount1."""
        return self._started_azurite.account_url

    def blob_url(self, container: str, prefix: str = "") -> str:
        """Path-style URL of a container, or of a prefix inside it (`prefix` is URL-quoted, "/" kept)."""
        url = f"{self.account_url}/{container}"
        return f"{url}/{urllib.parse.quote(prefix, safe='/')}" if prefix else url

    @property
    def openai_endpoint(self) -> str:
        """Azure OpenAI endpoint (HTTPS): https://127.0.0.1:<port>."""
        return f"https://{HOST}:{self._ready['openai_port']}"

    @property
    def openai_api_key(self) -> str:
        """The key the fake Azure OpenAI accepts in the `api-key` header."""
        return str(self._ready["openai_api_key"])

    @property
    def identity_endpoint(self) -> str:
        """IDENTITY_ENDPOINT of the fake managed-identity server (plain HTTP, as on Container Apps)."""
        return f"http://{HOST}:{self._ready['identity_port']}/msi/token"

    @property
    def identity_header(self) -> str:
        """IDENTITY_HEADER: the secret the managed-identity endpoint expects in X-IDENTITY-HEADER."""
        return str(self._ready["identity_header"])

    @property
    def tenant_id(self) -> str:
        """Tenant id stamped into every token (tid claim, issuer)."""
        return str(self._ready["tenant_id"])

    @property
    def user_assigned_client_id(self) -> str:
        """Client id of the user-assigned managed identity."""
        return str(self._ready["user_assigned"]["client_id"])

    @property
    def system_assigned_client_id(self) -> str:
        """Client id of the system-assigned managed identity."""
        return str(self._ready["system_assigned"]["client_id"])

    @property
    def mint(self) -> TokenMint:
        """A mint holding the fakes' signing key (its issued/revoked sets are separate from the fakes')."""
        if self._mint is None:
            raise RuntimeError("the stack is not started")
        return self._mint

    # ---- clients and environments -----------------------------------------------------------------

    def storage_credential(self) -> MintCredential:
        """A sync TokenCredential minting tokens locally (principal "test-harness")."""
        return MintCredential(self.mint, Principal.new("test-harness"))

    def blob_service(self) -> BlobServiceClient:
        """A sync BlobServiceClient for test set-up and checks; close it (or use `with`)."""
        return BlobServiceClient(
            self.account_url, credential=self.storage_credential(), connection_verify=str(self.ca_file)
        )

    def worker_env(self, auth: str = "managed-identity") -> dict[str, str]:
        """Full environment for a `worker` subprocess; `auth` is a key of worker_env.AUTH_MODES."""
        return worker_env(
            StackEndpoints(
                ca_file=self.ca_file,
                openai_endpoint=self.openai_endpoint,
                deployment=self.deployment,
                api_version=self.api_version,
                identity_endpoint=self.identity_endpoint,
                identity_header=self.identity_header,
                user_assigned_client_id=self.user_assigned_client_id,
                openai_api_key=self.openai_api_key,
            ),
            auth,
        )

    @property
    def openai(self) -> OpenAIAdmin:
        """Admin client of the fake Azure OpenAI: configure(**settings), reset(), stats(), config()."""
        if self._openai_admin is None:
            raise RuntimeError("the stack is not started")
        return self._openai_admin

    @property
    def identity(self) -> IdentityAdmin:
        """Admin client of the identity server: stats(), revoke_all(), configure(**settings), reset()."""
        if self._identity_admin is None:
            raise RuntimeError("the stack is not started")
        return self._identity_admin

    # ---- Azurite control --------------------------------------------------------------------------

    def stop_azurite(self, *, graceful: bool = True) -> None:
        """Stop Azurite (SIGTERM; `graceful=False` kills it and may lose its last ~5 s of metadata)."""
        self._started_azurite.stop(graceful=graceful)

    def start_azurite(self) -> None:
        """Start Azurite again on the same port with the same data."""
        self._started_azurite.start()

    def restart_azurite(self) -> None:
        """Stop and start Azurite on the same port, keeping its data."""
        self._started_azurite.restart()

    @property
    def _started_azurite(self) -> Azurite:
        if self._azurite is None:
            raise RuntimeError("the stack is not started")
        return self._azurite
