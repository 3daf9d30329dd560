"""structlog set-up: one JSON object a line on stdout in a job (Log Analytics parses them), or a console
rendering plus a progress bar in a terminal. Nothing that looks like a token or key is ever rendered.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# JWTs (three base64url parts starting eyJ), Azure keys (32+ hex/base64 chars after key=), SAS signatures.
_SECRET_PATTERNS = (
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
    re.compile(r"(?i)((?:account)?key|secret|sig|password|token)=([^;&\s\"']{8,})"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{16,}"),
)


def redact(text: str) -> str:
    """Replace anything shaped like a token, key or signature with a marker."""
    text = _SECRET_PATTERNS[0].sub("[redacted-jwt]", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}=[redacted]", text)
    return _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}[redacted]", text)


def _redact_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def configure(*, json_lines: bool, stream: TextIO | None = None, verbose: bool = False) -> None:
    """Set up structlog (and the standard library's logging for the SDKs, to stderr at WARNING)."""
    stream = stream or sys.stdout
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        structlog.processors.format_exc_info,
        _redact_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    level = logging.DEBUG if verbose else logging.INFO if json_lines else logging.WARNING
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for noisy in ("azure.core.pipeline.policies.http_logging_policy", "azure.identity"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
