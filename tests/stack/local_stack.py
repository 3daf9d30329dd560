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
from .directory import (
    GCP_FEDERATION,
    INTERACTIVE,
    SP_CERT,
    SP_SECRET,
    WORKLOAD_IDENTITY,
    WORKLOAD_SUBJECT,
    ExternalIssuer,
    kubernetes_token,
)
from .fake_az import LOGGED_OUT_MARKER
from .procs import ManagedProcess
from .scripts import write_fake_az, write_fake_browser
from .storage_proxy import StorageProxy
from .tokens import Principal, TokenMint
from .worker_env import StackEndpoints, worker_env

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEPLOYMENT = "gpt-4o-mini"
DEFAULT_API_VERSION = "2024-10-21"
HOST = "127.0.0.1"


class LocalStack:
    """Azurite over HTTPS with OAuth, a fake Azure OpenAI and stand-ins for every way to get an Entra token.

    Identity stand-ins: a managed-identity endpoint, an Entra authority (service principals with a secret or
    a certificate, federated credentials for workload identity and GCP, the interactive auth-code flow),
    a GCE metadata server, a fake `az` and a scripted browser.

    Everything runs on 127.0.0.1 under `workdir` (certificates in tls/, the tenant's secret files in entra/,
    Azurite data in azurite/, executables in bin/, `az` state in az/, process output in logs/). Azurite's
    data is wiped on start; it survives `restart_azurite()`.
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
        self._issuers: dict[str, ExternalIssuer] = {}
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
                    "--state-dir", str(self.workdir / "entra"),
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
            self._identity_admin = IdentityAdmin(self._identity_base_url)
            self._prepare_identity_files()
            self._exit_stack = cleanup.pop_all()
        self.startup_seconds = time.monotonic() - started

    def _prepare_identity_files(self) -> None:
        """Load the external issuers' keys; write the federated token file, the fake az and the browser."""
        self._issuers = {
            name: ExternalIssuer.load(name, facts["issuer"], Path(facts["key_file"]))
            for name, facts in self._entra["issuers"].items()
        }
        self.write_federated_token()
        write_fake_az(
            self.az_bin_dir,
            admin_url=self._identity_base_url,
            state_dir=self.workdir / "az",
            tenant_id=self.tenant_id,
            subscription_id=self.subscription_id,
            upn=self.user_upn,
        )
        self.az_login()
        write_fake_browser(
            self.az_bin_dir, ca_file=self.ca_file, log_file=self.workdir / "logs" / "browser.log"
        )

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
    def _identity_base_url(self) -> str:
        return f"http://{HOST}:{self._ready['identity_port']}"

    @property
    def _entra(self) -> dict[str, Any]:
        entra: dict[str, Any] = self._ready["entra"]
        return entra

    def _client_id(self, app: str) -> str:
        return str(self._entra["apps"][app]["client_id"])

    # ---- Entra authority and federation ---------------------------------------------------------------

    @property
    def authority_host(self) -> str:
        """AZURE_AUTHORITY_HOST of the fake Entra authority: https://127.0.0.1:<port>."""
        return f"https://{HOST}:{self._ready['authority_port']}"

    @property
    def subscription_id(self) -> str:
        """The subscription the fake `az` reports."""
        return str(self._entra["subscription_id"])

    @property
    def app_ids(self) -> dict[str, dict[str, str]]:
        """App registrations by name -> {"client_id", "object_id" (of the service principal)}."""
        return {name: dict(ids) for name, ids in self._entra["apps"].items()}

    @property
    def sp_client_id(self) -> str:
        """Client id of the service principal that authenticates with `sp_client_secret`."""
        return self._client_id(SP_SECRET)

    @property
    def sp_client_secret(self) -> str:
        """The client secret of `sp_client_id` (random per stack)."""
        return str(self._entra["sp_client_secret"])

    @property
    def sp_cert_client_id(self) -> str:
        """Client id of the service principal that authenticates with the certificate at `sp_cert_path`."""
        return self._client_id(SP_CERT)

    @property
    def sp_cert_path(self) -> Path:
        """PEM file with the private key and the certificate registered on `sp_cert_client_id`."""
        return Path(self._entra["sp_cert_path"])

    @property
    def workload_client_id(self) -> str:
        """Client id of the app whose federated credential trusts the Kubernetes service account."""
        return self._client_id(WORKLOAD_IDENTITY)

    @property
    def workload_issuer(self) -> ExternalIssuer:
        """The Kubernetes service-account issuer (https://oidc.local-aks.test/<uuid>/), with its key."""
        return self._issuers["kubernetes"]

    @property
    def workload_subject(self) -> str:
        """Subject of the federated credential: system:serviceaccount:batch:worker."""
        return WORKLOAD_SUBJECT

    @property
    def federated_token_file(self) -> Path:
        """AZURE_FEDERATED_TOKEN_FILE: a projected service-account token (rewrite it: write_federated_token)."""
        return self.workdir / "entra" / "federated-token"

    def write_federated_token(
        self, *, subject: str = WORKLOAD_SUBJECT, lifetime_s: int = 3600, path: Path | None = None
    ) -> str:
        """Mint a new service-account token (as the kubelet rotates it) into `path` (default the token file).

        WorkloadIdentityCredential re-reads the file at most every 10 minutes per credential instance.
        """
        token = kubernetes_token(self.workload_issuer, subject=subject, lifetime_s=lifetime_s)
        target = path or self.federated_token_file
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(token)
        temporary.replace(target)
        return token

    @property
    def gcp_client_id(self) -> str:
        """Client id of the app whose federated credential trusts the Google service account."""
        return self._client_id(GCP_FEDERATION)

    @property
    def google_issuer(self) -> ExternalIssuer:
        """The https://accounts.google.com issuer as the stack simulates it, with its key."""
        return self._issuers["google"]

    @property
    def gcp_service_account_id(self) -> str:
        """Numeric unique id of the Google service account (the `sub` of its ID tokens)."""
        return str(self._entra["gcp_service_account"]["unique_id"])

    @property
    def gcp_service_account_email(self) -> str:
        """E-mail of the Google service account."""
        return str(self._entra["gcp_service_account"]["email"])

    @property
    def gce_metadata_host(self) -> str:
        """GCE_METADATA_HOST of the fake metadata server: 127.0.0.1:<port> (plain HTTP)."""
        return f"{HOST}:{self._ready['gce_metadata_port']}"

    @property
    def interactive_client_id(self) -> str:
        """Client id of the public client app (redirect URI http://localhost, any port) for interactive sign-in."""
        return self._client_id(INTERACTIVE)

    @property
    def user_upn(self) -> str:
        """UPN of the directory's user: signed in to the fake az, and the one the scripted browser signs in."""
        return str(self._entra["user"]["upn"])

    @property
    def user_object_id(self) -> str:
        """Object id of the directory's user (`oid` of delegated tokens)."""
        return str(self._entra["user"]["object_id"])

    @property
    def az_bin_dir(self) -> Path:
        """Directory holding the fake `az` (and `browser`): prepend it to PATH."""
        return self.workdir / "bin"

    @property
    def browser(self) -> Path:
        """The scripted browser: set BROWSER to it for InteractiveBrowserCredential."""
        return self.az_bin_dir / "browser"

    def az_logout(self) -> None:
        """Make the fake az behave as after `az logout` (token requests fail: "Please run 'az login'...")."""
        marker = self.workdir / "az" / LOGGED_OUT_MARKER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def az_login(self) -> None:
        """Sign the fake az back in (the default)."""
        (self.workdir / "az" / LOGGED_OUT_MARKER).unlink(missing_ok=True)

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
                tenant_id=self.tenant_id,
                authority_host=self.authority_host,
                sp_client_id=self.sp_client_id,
                sp_client_secret=self.sp_client_secret,
                sp_cert_client_id=self.sp_cert_client_id,
                sp_cert_path=self.sp_cert_path,
                workload_client_id=self.workload_client_id,
                federated_token_file=self.federated_token_file,
                gcp_client_id=self.gcp_client_id,
                gce_metadata_host=self.gce_metadata_host,
                interactive_client_id=self.interactive_client_id,
                az_bin_dir=self.az_bin_dir,
                browser=self.browser,
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
        """Admin client of every identity stand-in: stats(), revoke_all(), configure(**settings), reset().

        stats(): `requests`/`by_status`/`by_kind` over all token requests (kinds: msi, entra, gce-metadata,
        az-cli), `issued` (minted tokens by source/audience/principal), `entra` (token requests by
        grant/kind/app/status, AADSTS error counts, authorize and claims requests), `gce_metadata`.
        """
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

    def storage_proxy(self) -> StorageProxy:
        """A TLS proxy in front of Azurite that can refuse appends with 403 (`with proxy.running():`)."""
        if self._tls is None:
            raise RuntimeError("the stack is not started")
        upstream = self._started_azurite.account_url.rsplit("/", 1)[0]
        return StorageProxy(upstream, self._tls)

    def freeze_azurite(self) -> None:
        """Make storage hang: Azurite is suspended until `thaw_azurite`."""
        self._started_azurite.freeze()

    def thaw_azurite(self) -> None:
        self._started_azurite.thaw()

    def restart_azurite(self) -> None:
        """Stop and start Azurite on the same port, keeping its data."""
        self._started_azurite.restart()

    @property
    def _started_azurite(self) -> Azurite:
        if self._azurite is None:
            raise RuntimeError("the stack is not started")
        return self._azurite
