"""Which names under SOURCE can become result paths under SINK, and keeping every path inside its root.

An input's custom_id is its path relative to SOURCE and its results go to `<path>.results.jsonl` under SINK,
so a name is used verbatim, never rewritten: rewriting `a//b.txt` to `a/b.txt` would give two inputs one
result file and one custom_id. A name that could leave the sink, or that file systems and blob tools
read differently, is not processed at all; the run reports it as `invalid_name`:

- an empty segment: a leading `/` (`prompts//tmp/x.txt` under the prefix `prompts/`), a trailing `/`, `//`;
- a `.` or `..` segment (HTTP clients collapse them, so such a blob cannot even be read by its name);
- a backslash (a separator on Windows and to several blob tools);
- a control character (C0, DEL, C1), NUL included;
- a local name that is not valid UTF-8 (Python holds its bytes as surrogate escapes).
"""

from __future__ import annotations

import re
from pathlib import Path

from worker.errors import UnsafeName

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def name_problem(path: str) -> str | None:
    """Why `path` (relative, '/'-separated) cannot be used as an input name, or None when it can."""
    if not path:
        return "the name is empty"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "the name is not valid UTF-8"
    if _CONTROL.search(path):
        return "the name contains a control character"
    if "\\" in path:
        return "the name contains a backslash"
    segments = path.split("/")
    if "" in segments:
        return "the name has an empty segment (a leading '/', a trailing '/' or '//')"
    if "." in segments or ".." in segments:
        return "the name has a '.' or '..' segment"
    return None


def shown(path: str) -> str:
    """`path` as it can be printed and logged: undecodable bytes and control characters as `\\xNN`."""
    try:
        data = path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = path.encode("utf-8", "backslashreplace")
    text = data.decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing (UnsafeName) a name that is not valid or a path whose real location,
    symbolic links followed, is outside the real `root`."""
    problem = name_problem(relative)
    if problem is not None:
        raise UnsafeName(f"{shown(relative)}: {problem}")
    path = root / relative
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeName(f"{shown(relative)} leads outside {root} (through a symbolic link)")
    return path
