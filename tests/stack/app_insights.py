"""A fake Application Insights ingestion endpoint on 127.0.0.1, for the real Azure Monitor exporter.

The exporter POSTs its envelopes (a JSON array, gzip'd or not) to `{IngestionEndpoint}/v2.1/track`;
the fake answers as the service does (`{"itemsReceived", "itemsAccepted", "errors"}`). The exporter
accepts a plain-http IngestionEndpoint, so no TLS is needed.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONNECTION_STRING_ENV = "APPLICATIONINSIGHTS_CONNECTION_STRING"
TRACK_PATH = "/v2.1/track"
METRIC_ENVELOPE = "Microsoft.ApplicationInsights.Metric"


class FakeIngestion:
    """Application Insights' ingestion endpoint: `POST /v2.1/track` with a JSON array of envelopes.

    mode: "accept" (200, all accepted), "reject" (400, every item refused), "error" (500),
    "hang" (reads the request, never answers until the fake stops).
    """

    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, whatever it was
        self.mode = "accept"
        self.instrumentation_key = str(uuid.uuid4())
        self._release = threading.Event()
        self._changed = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._note("GET", self.path)
                self._answer(404, {"error": "not the ingestion API"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip" or body[:2] == b"\x1f\x8b":
                    body = gzip.decompress(body)
                fake._note("POST", self.path)
                if self.path.split("?")[0] != TRACK_PATH:
                    self._answer(404, {"error": "unknown path"})
                    return
                items = json.loads(body)
                if fake.mode == "hang":
                    fake._release.wait(30)
                    self.close_connection = True
                    return
                if fake.mode == "error":
                    self._answer(500, {"itemsReceived": len(items), "itemsAccepted": 0, "errors": []})
                    return
                if fake.mode == "reject":
                    errors = [
                        {
                            "index": i,
                            "statusCode": 400,
                            "message": "Field 'name' on type 'MetricData' is invalid",
                        }
                        for i in range(len(items))
                    ]
                    self._answer(400, {"itemsReceived": len(items), "itemsAccepted": 0, "errors": errors})
                    return
                with fake._changed:
                    fake.envelopes.extend(items)
                    fake._changed.notify_all()
                self._answer(200, {"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []})

            def _answer(self, status: int, document: dict[str, Any]) -> None:
                payload = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def _note(self, method: str, path: str) -> None:
        with self._changed:
            self.requests.append((method, path))
            self._changed.notify_all()

    def __enter__(self) -> FakeIngestion:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    @property
    def connection_string(self) -> str:
        return f"InstrumentationKey={self.instrumentation_key};IngestionEndpoint={self.endpoint}"

    def environ(self) -> dict[str, str]:
        """The variables that point a process's exporter here, past any proxy the machine configures."""
        return {CONNECTION_STRING_ENV: self.connection_string, "NO_PROXY": "127.0.0.1,localhost"}

    def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def points(self, name: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
        """(data point, properties) of every metric envelope named `name`."""
        found = []
        for envelope in self.envelopes:
            if envelope.get("name") != METRIC_ENVELOPE:
                continue
            data = envelope["data"]["baseData"]
            for point in data["metrics"]:
                if point["name"] == name:
                    found.append((point, data.get("properties") or {}))
        return found

    def total(self, name: str, **properties: str) -> float:
        return float(
            sum(
                point["value"]
                for point, props in self.points(name)
                if all(props.get(k) == v for k, v in properties.items())
            )
        )
