"""A TLS reverse proxy in front of Azurite that can refuse appends the way Storage refuses a principal
whose role was removed (403 AuthorizationPermissionMismatch). Runs on its own thread, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
from aiohttp import web

from .certs import TlsFiles, client_ssl_context, server_ssl_context

HOST = "127.0.0.1"
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
PERMISSION_MISMATCH = (
    '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthorizationPermissionMismatch</Code>'
    "<Message>This request is not authorized to perform this operation using this permission.</Message>"
    "</Error>"
)


class StorageProxy:
    """`deny_appends = True` makes every Append Block answer 403; everything else is forwarded."""

    def __init__(self, upstream: str, tls: TlsFiles) -> None:
        self._upstream = upstream.rstrip("/")
        self._tls = tls
        self.deny_appends = False
        self.appends_denied = 0
        self.port = 0

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.deny_appends and request.query.get("comp") == "appendblock":
            self.appends_denied += 1
            return web.Response(
                status=403,
                text=PERMISSION_MISMATCH,
                content_type="application/xml",
                headers={"x-ms-error-code": "AuthorizationPermissionMismatch"},
            )
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method, self._upstream + request.path_qs, headers=headers, data=body
        ) as answer:
            payload = await answer.read()
            out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=answer.status, body=payload, headers=out)

    async def _serve(self, ready: threading.Event, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(self._tls.ca))
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            self._session = session
            app = web.Application(client_max_size=256 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._forward)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, HOST, 0, ssl_context=server_ssl_context(self._tls))
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            await stop.wait()
            await runner.cleanup()

    @contextmanager
    def running(self) -> Iterator[StorageProxy]:
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        ready = threading.Event()
        thread = threading.Thread(
            target=loop.run_until_complete, args=(self._serve(ready, stop),), daemon=True
        )
        thread.start()
        assert ready.wait(30), "the storage proxy did not start"
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(30)
            loop.close()
