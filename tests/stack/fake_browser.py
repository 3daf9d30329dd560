"""A scripted browser for InteractiveBrowserCredential (standard library only).

Installed by `scripts.write_fake_browser` as `<workdir>/bin/browser`; with `BROWSER=<that path>` Python's
`webbrowser` runs `browser URL`. The "user" is already signed in: the browser GETs the authorize URL
(trusting the stack's CA), takes the code from the answer (a 302 to the redirect URI, or the auto-submitting
form of response_mode=form_post, which is what MSAL asks for) and delivers it to the redirect URI.

Python's webbrowser runs a BROWSER command with `GenericBrowser`, which *waits for it to exit*, and
azure-identity only starts serving its localhost listener after `webbrowser.open` returns. So the delivery to
a localhost redirect URI is handed to a detached child and the browser exits 0 right away; doing it in the
foreground would deadlock until timeout. Failing before that (authority unreachable, an error page) exits 1,
which webbrowser reports as "could not open" (azure-identity: "Failed to open a browser").
"""

from __future__ import annotations

import contextlib
import html.parser
import http.client
import os
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 120.0
"""How long the detached child waits for the redirect listener's answer, in seconds."""
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
USER_AGENT = "local-stack-browser/1.0"


class BrowserError(Exception):
    """The sign-in page did not lead to the redirect URI."""


@dataclass(frozen=True)
class Navigation:
    """The request that takes the browser to the redirect URI."""

    method: str
    url: str
    body: bytes | None = None


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.method = "GET"
        self.fields: dict[str, str] = {}
        self._in_form = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form" and self.action is None:
            self.action = attributes.get("action", "")
            self.method = attributes.get("method", "GET").upper()
            self._in_form = True
        elif tag == "input" and self._in_form and attributes.get("name"):
            self.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False


def _request(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    ca_file: str | None = None,
    timeout: float = TIMEOUT_S,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ca_file)
        connection = http.client.HTTPSConnection(host, parts.port or 443, context=context, timeout=timeout)
    else:
        connection = http.client.HTTPConnection(host, parts.port or 80, timeout=timeout)
    headers = {"User-Agent": USER_AGENT, "Accept": "text/html,*/*"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def sign_in(url: str, ca_file: str | None) -> Navigation:
    """Follow the sign-in page until it points at the app's redirect URI."""
    for _ in range(10):
        status, headers, body = _request("GET", url, ca_file=ca_file)
        location = headers.get("Location")
        if status in (301, 302, 303, 307) and location:
            url = urllib.parse.urljoin(url, location)
            if _is_local(url):
                return Navigation("GET", url)
            continue
        if status == 200:
            form = _FormParser()
            form.feed(body.decode(errors="replace"))
            if form.action:
                action = urllib.parse.urljoin(url, form.action)
                if form.method == "POST":
                    return Navigation("POST", action, urllib.parse.urlencode(form.fields).encode())
                return Navigation("GET", f"{action}?{urllib.parse.urlencode(form.fields)}")
        raise BrowserError(f"sign-in page answered {status}: {body.decode(errors='replace')[:500]}")
    raise BrowserError("too many redirects")


def _is_local(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "http" and parts.hostname in LOCAL_HOSTS


def deliver(navigation: Navigation, *, deadline_s: float = DELIVERY_TIMEOUT_S) -> int:
    """Send the navigation to the redirect URI (retrying while nothing listens yet); returns the status."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            status, _, _ = _request(
                navigation.method, navigation.url, body=navigation.body, timeout=deadline_s
            )
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        return status


def _log(log_file: str, message: str) -> None:
    with contextlib.suppress(OSError), open(log_file, "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {message}\n")


def _detach_and_deliver(navigation: Navigation, log_file: str) -> None:
    """Fork a child that delivers `navigation`; the parent returns immediately."""
    if os.fork() != 0:
        return
    exit_code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # don't hold the caller's pipes open
            os.dup2(devnull, fd)
        status = deliver(navigation)
        _log(log_file, f"redirect URI answered {status}")
        exit_code = 0
    except BaseException as error:  # the detached child must log, never raise
        _log(log_file, f"delivery failed: {error!r}")
    finally:
        os._exit(exit_code)


def main(config: dict[str, Any], argv: list[str]) -> int:
    """Open `argv[-1]` like a signed-in user would; returns the exit code."""
    log_file = config["log_file"]
    if not argv:
        sys.stderr.write("usage: browser URL\n")
        return 2
    url = argv[-1]
    _log(log_file, f"open {url}")
    try:
        navigation = sign_in(url, config.get("ca_file"))
    except (BrowserError, OSError) as error:
        _log(log_file, f"sign-in failed: {error}")
        sys.stderr.write(f"browser: {error}\n")
        return 1
    _log(log_file, f"{navigation.method} {navigation.url.split('?')[0]}")
    if _is_local(navigation.url):
        _detach_and_deliver(navigation, log_file)
        return 0
    deliver(navigation)
    return 0
