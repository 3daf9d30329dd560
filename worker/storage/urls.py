"""Parse a SOURCE or SINK into a local folder or a blob location, and tell which source paths are the
worker's own output when the sink lies inside the source (`overlap_filter`).

Blob URLs come in two styles:
- virtual-host: https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX (and private link)
- path-style, as Azurite and some proxies use: https://127.0.0.1:10000/ACCOUNT/CONTAINER/PREFIX
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.errors import ConfigError
from worker.formats import RESULT_SUFFIX


@dataclass(frozen=True, kw_only=True)
class BlobLocation:
    """A folder in a blob container. `prefix` is empty or ends with '/'."""

    account_url: str
    account: str
    container: str
    prefix: str

    def __str__(self) -> str:
        return f"{self.account_url}/{self.container}/{self.prefix}"


@dataclass(frozen=True, kw_only=True)
class LocalLocation:
    """A folder on the local file system."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


Location = BlobLocation | LocalLocation


def _is_path_style(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _folder(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def parse_location(value: str, *, what: str) -> Location:
    """Turn a SOURCE/SINK string into a location; `what` names the setting in error messages."""
    if value.startswith("file://"):
        return LocalLocation(path=Path(unquote(urlsplit(value).path)))
    if not value.startswith(("https://", "http://")):
        return LocalLocation(path=Path(value).expanduser())

    parts = urlsplit(value)
    if parts.query or parts.fragment:
        raise ConfigError(
            f"{what}: a blob URL must not carry a query or fragment (a SAS token is not used: "
            "the worker authenticates with Entra ID); remove everything after '?'"
        )
    host = parts.hostname or ""
    segments = [unquote(s) for s in parts.path.split("/") if s]
    base = f"{parts.scheme}://{parts.netloc}"
    if _is_path_style(host):
        if len(segments) < 2:
            raise ConfigError(
                f"{what}: path-style blob URL needs an account and a container: "
                f"{base}/ACCOUNT/CONTAINER[/PREFIX]"
            )
        account, container, rest = segments[0], segments[1], segments[2:]
        account_url = f"{base}/{account}"
    else:
        if not segments:
            raise ConfigError(f"{what}: blob URL needs a container: {base}/CONTAINER[/PREFIX]")
        account, container, rest = host.split(".")[0], segments[0], segments[1:]
        account_url = base
    return BlobLocation(
        account_url=account_url, account=account, container=container, prefix=_folder("/".join(rest))
    )


def overlap_filter(source: Location, sink: Location) -> Callable[[str], bool]:
    """When the sink lies inside the source, the source listing must not pick up the worker's own output."""
    inside: str | None = None
    if isinstance(source, LocalLocation) and isinstance(sink, LocalLocation):
        src, dst = source.path.resolve(), sink.path.resolve()
        if dst == src or src in dst.parents:
            inside = dst.relative_to(src).as_posix()
            inside = "" if inside == "." else inside + "/"
    elif (
        isinstance(source, BlobLocation)
        and isinstance(sink, BlobLocation)
        and (source.account_url, source.container) == (sink.account_url, sink.container)
        and sink.prefix.startswith(source.prefix)
    ):
        inside = sink.prefix[len(source.prefix) :]
    if inside is None:
        return lambda _path: False
    if inside:
        return lambda path: path.startswith(inside)
    return lambda path: path.endswith(RESULT_SUFFIX) or path.startswith("_")
