"""A throwaway certificate authority and a server certificate for 127.0.0.1 / localhost.

Azurite only accepts bearer tokens over HTTPS and azure-identity only talks to an authority over HTTPS,
so every TLS endpoint of the local stack serves the same trustme-issued certificate.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files in one directory: the CA certificate, the server certificate chain and its key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        """The conventional file names inside `directory` (ca.pem, server.pem, server.key)."""
        return cls(ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key")

    def exist(self) -> bool:
        """True when all three files are present."""
        return self.ca.is_file() and self.cert.is_file() and self.key.is_file()


def write_tls_files(directory: Path) -> TlsFiles:
    """Create a fresh CA and a server certificate for 127.0.0.1 and localhost in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_dir(directory)
    ca = trustme.CA(organization_name="aoai-batch-worker local stack")
    leaf = ca.issue_cert(*SERVER_NAMES, common_name="127.0.0.1")
    files.ca.write_bytes(ca.cert_pem.bytes())
    files.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    files.key.touch(mode=0o600)
    files.key.write_bytes(leaf.private_key_pem.bytes())
    return files


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A server-side TLS context presenting the stack's certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=files.cert, keyfile=files.key)
    return context


def client_ssl_context(ca_file: Path) -> ssl.SSLContext:
    """A client-side TLS context that trusts only the stack's CA."""
    return ssl.create_default_context(cafile=str(ca_file))
