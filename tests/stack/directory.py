"""The fake Entra tenant's directory: app registrations with their credentials, a signed-in user, and the
external token issuers (a Kubernetes service-account issuer, Google) that federated credentials trust.

The fakes process creates it (`EntraDirectory.new`), writing the secret material into a state directory:
the certificate app's `sp_cert.pem` (private key + certificate, as CertificateCredential wants it) and the
external issuers' signing keys, so the test process can mint federated assertions (`ExternalIssuer.load`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from .tokens import Principal

FEDERATION_AUDIENCE = "api://AzureADTokenExchange"
"""The audience Entra expects in federated assertions (workload identity, GCP, GitHub...)."""
GOOGLE_ISSUER = "https://accounts.google.com"
WORKLOAD_NAMESPACE = "batch"
WORKLOAD_SERVICE_ACCOUNT = "worker"
WORKLOAD_SUBJECT = f"system:serviceaccount:{WORKLOAD_NAMESPACE}:{WORKLOAD_SERVICE_ACCOUNT}"
AZURE_CLI_CLIENT_ID = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
"""The Azure CLI's well-known public client id: the `appid` of tokens from `az account get-access-token`."""
REDIRECT_LOCALHOST = "http://localhost"
"""The public client's registered redirect URI; as in Entra, any port on localhost matches it."""

SP_CERT_FILE = "sp_cert.pem"
K8S_KEY_FILE = "k8s-issuer-key.pem"
GOOGLE_KEY_FILE = "google-issuer-key.pem"

# App registration names (also the `principal` label in token stats).
SP_SECRET = "sp-secret"
SP_CERT = "sp-cert"
WORKLOAD_IDENTITY = "workload-identity"
GCP_FEDERATION = "gcp-federation"
INTERACTIVE = "interactive"
AZURE_CLI = "azure-cli"


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_secret(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data)


def b64url(data: bytes) -> str:
    """Unpadded base64url, as in JWT headers and PKCE."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True)
class ExternalIssuer:
    """An OIDC issuer outside Entra whose tokens federated credentials accept (the stack holds its key)."""

    name: str
    """Short label used in stats: "kubernetes" or "google"."""
    issuer: str
    """The `iss` claim, e.g. https://accounts.google.com."""
    private_key: rsa.RSAPrivateKey

    @property
    def kid(self) -> str:
        """Key id put in the JWT header (a digest of the public key)."""
        der = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return hashlib.sha256(der).hexdigest()[:40]

    @classmethod
    def new(cls, name: str, issuer: str) -> ExternalIssuer:
        """An issuer with a fresh RSA key."""
        return cls(name=name, issuer=issuer, private_key=_new_rsa_key())

    @classmethod
    def load(cls, name: str, issuer: str, key_file: Path) -> ExternalIssuer:
        """The issuer whose key `write_key` stored in `key_file`."""
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"{key_file} does not hold an RSA private key")
        return cls(name=name, issuer=issuer, private_key=key)

    def write_key(self, key_file: Path) -> None:
        """Store the signing key (PKCS#8 PEM, owner-only)."""
        _write_secret(key_file, _private_pem(self.private_key))

    def mint(
        self,
        subject: str,
        *,
        audience: str | list[str] = FEDERATION_AUDIENCE,
        lifetime_s: int = 3600,
        issued_at: int | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """An RS256 JWT from this issuer for `subject`; `claims` are added (or override)."""
        now = int(time.time()) if issued_at is None else issued_at
        payload = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime_s,
            **(claims or {}),
        }
        return jwt.encode(payload, self.private_key, algorithm="RS256", headers={"kid": self.kid})

    def verify_signature(self, token: str) -> dict[str, Any]:
        """The claims if `token` is signed by this issuer's key (times and audience are not checked here)."""
        claims: dict[str, Any] = jwt.decode(
            token,
            self.private_key.public_key(),
            algorithms=["RS256"],
            options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
        )
        return claims


def kubernetes_token(
    issuer: ExternalIssuer, *, subject: str = WORKLOAD_SUBJECT, lifetime_s: int = 3600
) -> str:
    """A projected service-account token like the one AKS mounts at AZURE_FEDERATED_TOKEN_FILE."""
    namespace, _, account = subject.removeprefix("system:serviceaccount:").partition(":")
    return issuer.mint(
        subject,
        audience=[FEDERATION_AUDIENCE],
        lifetime_s=lifetime_s,
        claims={
            "kubernetes.io": {
                "namespace": namespace,
                "pod": {"name": f"{account}-7d9f8c6b5-x2x9q", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            },
        },
    )


@dataclass(frozen=True)
class AppCertificate:
    """A certificate registered on an app (public part only)."""

    pem: bytes

    @property
    def _cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem)

    @property
    def sha1_thumbprint(self) -> str:
        """base64url SHA-1 thumbprint: the `x5t` JWT header."""
        return base64.urlsafe_b64encode(self._cert.fingerprint(hashes.SHA1())).decode()

    @property
    def sha256_thumbprint(self) -> str:
        """base64url SHA-256 thumbprint: the `x5t#S256` JWT header (what azure-identity sends)."""
        return base64.urlsafe_b64encode(self._cert.fingerprint(hashes.SHA256())).decode()

    def public_key(self) -> rsa.RSAPublicKey:
        """The certificate's RSA public key."""
        key = self._cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise TypeError("only RSA certificates are supported")
        return key

    def matches(self, header: dict[str, Any]) -> bool:
        """True when a JWT header's x5t#S256 or x5t names this certificate (padding-insensitive)."""

        def same(given: Any, ours: str) -> bool:
            return isinstance(given, str) and given.rstrip("=") == ours.rstrip("=")

        return same(header.get("x5t#S256"), self.sha256_thumbprint) or same(
            header.get("x5t"), self.sha1_thumbprint
        )


def self_signed_certificate(common_name: str) -> tuple[rsa.RSAPrivateKey, bytes]:
    """A new RSA key and a self-signed certificate (PEM) for it, valid for a year."""
    key = _new_rsa_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class FederatedCredential:
    """A federated identity credential on an app: tokens with this issuer+subject+audience are accepted."""

    issuer: str
    subject: str
    audiences: tuple[str, ...] = (FEDERATION_AUDIENCE,)


@dataclass(frozen=True)
class AppRegistration:
    """An app registration and its service principal."""

    name: str
    client_id: str
    object_id: str
    """Object id of the app's service principal: the `oid` of its app-only tokens."""
    secret: str | None = None
    certificates: tuple[AppCertificate, ...] = ()
    federated: tuple[FederatedCredential, ...] = ()
    public_client: bool = False
    redirect_uris: tuple[str, ...] = ()

    @property
    def principal(self) -> Principal:
        """The service principal, for minting app-only tokens."""
        return Principal(name=self.name, client_id=self.client_id, object_id=self.object_id)

    @classmethod
    def new(cls, name: str, **credentials: Any) -> AppRegistration:
        """An app with fresh ids and the given credentials (see the fields)."""
        return cls(name=name, client_id=str(uuid.uuid4()), object_id=str(uuid.uuid4()), **credentials)

    def accepts_redirect(self, redirect_uri: str) -> bool:
        """Whether `redirect_uri` matches a registered one; for http://localhost any port matches."""
        given = urlsplit(redirect_uri)
        for registered in map(urlsplit, self.redirect_uris):
            if (given.scheme, given.hostname, given.path.rstrip("/")) != (
                registered.scheme,
                registered.hostname,
                registered.path.rstrip("/"),
            ):
                continue
            if given.port == registered.port or (
                registered.port is None and registered.hostname == "localhost"
            ):
                return True
        return False


@dataclass(frozen=True)
class DirectoryUser:
    """The one human user of the tenant (signed in to `az`, and the one the scripted browser signs in)."""

    upn: str
    object_id: str
    display_name: str

    def principal(self, client_id: str) -> Principal:
        """The user acting through the public client `client_id` (for minting delegated tokens)."""
        return Principal(name=f"user:{self.upn}", client_id=client_id, object_id=self.object_id)


@dataclass(frozen=True)
class GcpServiceAccount:
    """The Google service account the fake metadata server speaks for."""

    unique_id: str
    """The numeric "unique ID": the `sub` of its Google ID tokens and the federated credential's subject."""
    email: str
    project_id: str
    project_number: str


@dataclass(frozen=True)
class EntraDirectory:
    """Everything the fake authority knows: tenant, apps, the user, external issuers."""

    tenant_id: str
    subscription_id: str
    apps: dict[str, AppRegistration]
    user: DirectoryUser
    kubernetes: ExternalIssuer
    google: ExternalIssuer
    gcp_account: GcpServiceAccount
    sp_cert_path: Path
    issuer_key_files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def new(cls, state_dir: Path, tenant_id: str) -> EntraDirectory:
        """A fresh directory; the cert app's PEM and the issuers' keys are written to `state_dir`."""
        state_dir.mkdir(parents=True, exist_ok=True)
        kubernetes = ExternalIssuer.new("kubernetes", f"https://oidc.local-aks.test/{uuid.uuid4()}/")
        google = ExternalIssuer.new("google", GOOGLE_ISSUER)
        gcp_account = GcpServiceAccount(
            unique_id=str(10**20 + secrets.randbelow(9 * 10**20)),
            email="batch-worker@local-stack-project.iam.gserviceaccount.com",
            project_id="local-stack-project",
            project_number=str(10**11 + secrets.randbelow(9 * 10**11)),
        )
        cert_key, cert_pem = self_signed_certificate("aoai-batch-worker-sp")
        sp_cert_path = state_dir / SP_CERT_FILE
        _write_secret(sp_cert_path, _private_pem(cert_key) + cert_pem)
        key_files = {"kubernetes": state_dir / K8S_KEY_FILE, "google": state_dir / GOOGLE_KEY_FILE}
        kubernetes.write_key(key_files["kubernetes"])
        google.write_key(key_files["google"])
        apps = [
            AppRegistration.new(SP_SECRET, secret=f"{secrets.token_urlsafe(3)}~{secrets.token_urlsafe(28)}"),
            AppRegistration.new(SP_CERT, certificates=(AppCertificate(cert_pem),)),
            AppRegistration.new(
                WORKLOAD_IDENTITY, federated=(FederatedCredential(kubernetes.issuer, WORKLOAD_SUBJECT),)
            ),
            AppRegistration.new(
                GCP_FEDERATION, federated=(FederatedCredential(GOOGLE_ISSUER, gcp_account.unique_id),)
            ),
            AppRegistration.new(INTERACTIVE, public_client=True, redirect_uris=(REDIRECT_LOCALHOST,)),
            # First-party, present in every tenant: InteractiveBrowserCredential's default client id.
            AppRegistration(
                AZURE_CLI,
                client_id=AZURE_CLI_CLIENT_ID,
                object_id=str(uuid.uuid4()),
                public_client=True,
                redirect_uris=(REDIRECT_LOCALHOST,),
            ),
        ]
        return cls(
            tenant_id=tenant_id,
            subscription_id=str(uuid.uuid4()),
            apps={app.name: app for app in apps},
            user=DirectoryUser(
                upn="developer@local-stack.test", object_id=str(uuid.uuid4()), display_name="Local Developer"
            ),
            kubernetes=kubernetes,
            google=google,
            gcp_account=gcp_account,
            sp_cert_path=sp_cert_path,
            issuer_key_files=key_files,
        )

    def app_by_client_id(self, client_id: str) -> AppRegistration | None:
        """The app registration with this client id (case-insensitive), if any."""
        wanted = client_id.lower()
        return next((app for app in self.apps.values() if app.client_id == wanted), None)

    def issuer_for(self, iss: str) -> ExternalIssuer | None:
        """The external issuer whose `iss` is exactly `iss`, if any."""
        return next((i for i in (self.kubernetes, self.google) if i.issuer == iss), None)

    def as_json(self) -> dict[str, Any]:
        """Ids, secrets and file paths for the ready file (read by LocalStack)."""
        return {
            "subscription_id": self.subscription_id,
            "apps": {
                name: {"client_id": a.client_id, "object_id": a.object_id} for name, a in self.apps.items()
            },
            "sp_client_secret": self.apps[SP_SECRET].secret,
            "sp_cert_path": str(self.sp_cert_path),
            "user": {"upn": self.user.upn, "object_id": self.user.object_id, "name": self.user.display_name},
            "issuers": {
                issuer.name: {"issuer": issuer.issuer, "key_file": str(self.issuer_key_files[issuer.name])}
                for issuer in (self.kubernetes, self.google)
            },
            "gcp_service_account": {
                "unique_id": self.gcp_account.unique_id,
                "email": self.gcp_account.email,
                "project_id": self.gcp_account.project_id,
            },
        }
