"""The built wheel, installed in a clean virtual environment and run as an unprivileged user.

This stands in for the container image (there is no Docker engine here): the image is "a venv with the
wheel and its dependencies, run as a non-root user with nothing configured". The steps:

1. `pip wheel --no-deps` builds the wheel from a copy of what the Dockerfile copies (pyproject.toml,
   README.md, worker/), so nothing is written into the work tree.
2. Fresh venvs (`--without-pip`, no system site-packages) from an interpreter the unprivileged user can
   run, filled from requirements/lock.txt, the hash-locked list the image installs:
   - "image": as the Dockerfile does it, `pip install --require-hashes -r requirements/lock.txt`, then
     the wheel with `--no-deps`, then `pip check` (the lock satisfies the wheel's declared ranges);
   - "plain": `pip install WHEEL` with the lock's pins as constraints, so the resolver follows the wheel's
     own metadata (no extra) and lands on the image's versions; a dependency the lock lacks shows up
     as a package the lock does not pin.
3. `worker --help` and `worker doctor` run as `nobody` (setpriv) with an empty environment, inside a new
   network namespace (unshare): unconfigured, DefaultAzureCredential probes the instance metadata service
   (169.254.169.254), which must not leave this machine.

The image venv (with the azure-monitor extra, as the lock has it) exports to a fake ingestion endpoint
on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.stack.app_insights import FakeIngestion

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("pyproject.toml", "README.md", "worker")  # what the Dockerfile copies into the build
LOCK = ROOT / "requirements" / "lock.txt"  # what the Dockerfile installs the dependencies from

pytestmark = pytest.mark.timeout(600)


@dataclass
class Installed:
    venv: Path
    wheel: Path
    as_user: list[str]  # command prefix that drops to an unprivileged user (empty when not root)
    isolated: list[str]  # command prefix for a new network namespace (empty when unavailable)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def worker(self) -> str:
        return str(self.venv / "bin" / "worker")

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    def run(
        self, *args: str, env: dict[str, str] | None = None, offline: bool = False
    ) -> subprocess.CompletedProcess[str]:
        command = [*(self.isolated if offline else []), *self.as_user, *args]
        return subprocess.run(
            command, env=env or {}, capture_output=True, text=True, timeout=120, check=False, cwd="/"
        )


def _timed(timings: dict[str, float], name: str, command: list[str]) -> None:
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, check=False)
    timings[name] = round(time.monotonic() - started, 2)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _unprivileged_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []  # already unprivileged
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot drop privileges")
    nobody = pwd.getpwnam("nobody")
    return [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--"]


def _network_namespace_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return []
    probe = subprocess.run([unshare, "--net", "--", "true"], capture_output=True, timeout=30, check=False)
    return [unshare, "--net", "--"] if probe.returncode == 0 else []


def _base_python(as_user: list[str]) -> str:
    """A Python 3.11 the unprivileged user can run: the test's own may live under /root (pyenv)."""
    candidates = [
        getattr(sys, "_base_executable", sys.executable),
        "/usr/local/bin/python3.11",  # python:3.11-slim, as in the image
        "/usr/bin/python3.11",
        shutil.which("python3.11") or "",
    ]
    for candidate in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        probe = subprocess.run(
            [*as_user, candidate, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 11))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={},
            cwd="/",
        )
        if probe.stdout.strip() == "True":
            return candidate
    pytest.skip("no Python 3.11 interpreter that an unprivileged user can run")


def _pip(venv: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "--python",
        str(venv / "bin" / "python"),
        *args,
    ]


def _new_venv(name: str, tmp_root: Path, base: str, timings: dict[str, float]) -> Path:
    venv = tmp_root / f"venv-{name}"
    _timed(timings, f"venv-{name}", [base, "-m", "venv", "--without-pip", str(venv)])
    return venv


def lock_pins(lock: Path) -> dict[str, str]:
    """Canonical name -> pinned version, from a `make lock` file."""
    pins = {}
    for line in lock.read_text().splitlines():
        if line[:1].isalnum():
            requirement = Requirement(line.rstrip(" \\"))
            [specifier] = requirement.specifier
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _constraints(lock: Path, into: Path) -> Path:
    """The lock's pins without their hashes: a hash in a constraint turns on hash-checking for every
    requirement, which a freshly built wheel cannot pass."""
    into.write_text("".join(f"{name}=={version}\n" for name, version in lock_pins(lock).items()))
    return into


@pytest.fixture(scope="module")
def built() -> Iterator[tuple[Path, Path, str, list[str], list[str], dict[str, float]]]:
    as_user = _unprivileged_prefix()
    base = _base_python(as_user)
    tmp_root = Path(tempfile.mkdtemp(prefix="worker-package-"))
    tmp_root.chmod(0o755)  # pytest's tmp_path is private to root; the venv must be readable by nobody
    timings: dict[str, float] = {}
    try:
        source = tmp_root / "src"
        source.mkdir()
        for name in SHIPPED:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, source / name)
        dist = tmp_root / "dist"
        _timed(
            timings,
            "wheel",
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(source)],
        )
        [wheel] = dist.glob("aoai_batch_worker-*.whl")
        yield tmp_root, wheel, base, as_user, _network_namespace_prefix(), timings
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(built: tuple[Path, Path, str, list[str], list[str], dict[str, float]]) -> Installed:
    """`pip install WHEEL` resolved from the wheel's own metadata, held to the lock's versions."""
    tmp_root, wheel, base, as_user, isolated, timings = built
    venv = _new_venv("plain", tmp_root, base, timings)
    pins = _constraints(LOCK, tmp_root / "pins.txt")
    _timed(
        timings,
        "install-plain",
        _pip(venv, "install", "--quiet", "--only-binary=:all:", "-c", str(pins), str(wheel)),
    )
    return Installed(venv, wheel, as_user, isolated, timings)


@pytest.fixture(scope="module")
def installed_with_monitor(
    built: tuple[Path, Path, str, list[str], list[str], dict[str, float]],
) -> Installed:
    """The image's venv: the hash-locked dependencies (with the azure-monitor extra), then the wheel alone."""
    tmp_root, wheel, base, as_user, isolated, timings = built
    venv = _new_venv("image", tmp_root, base, timings)
    _timed(
        timings,
        "install-lock",
        _pip(venv, "install", "--quiet", "--require-hashes", "--only-binary=:all:", "-r", str(LOCK)),
    )
    _timed(timings, "install-wheel", _pip(venv, "install", "--quiet", "--no-deps", str(wheel)))
    _timed(timings, "pip-check", _pip(venv, "check"))
    return Installed(venv, wheel, as_user, isolated, timings)


def installed_versions(venv: Installed) -> dict[str, str]:
    listed = subprocess.run(
        _pip(venv.venv, "list", "--format", "json", "--exclude", "aoai-batch-worker"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed.stdout)}


# ---- the lock -----------------------------------------------------------------------------------------


def test_the_lock_pins_every_dependency_within_pyproject_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for lock, wanted in [
        (LOCK, project["dependencies"] + extras["azure-monitor"]),
        (LOCK.with_name("dev-lock.txt"), [r for r in extras["dev"] if not r.startswith(project["name"])]),
    ]:
        pins = lock_pins(lock)
        for line in wanted:
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock.name} lacks {name}: run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock.name} pins {name}=={pins[name]}, outside {requirement.specifier}: run `make lock`"
            )


def test_the_dev_lock_tests_what_the_image_gets() -> None:
    image, dev = lock_pins(LOCK), lock_pins(LOCK.with_name("dev-lock.txt"))
    differ = {name: (version, dev.get(name)) for name, version in image.items() if dev.get(name) != version}
    assert not differ, f"(lock.txt, dev-lock.txt) versions differ: {differ}; run `make lock`"


def test_the_plain_install_needs_nothing_the_lock_does_not_pin(installed: Installed) -> None:
    pins = lock_pins(LOCK)
    unpinned = {name: v for name, v in installed_versions(installed).items() if pins.get(name) != v}
    assert not unpinned, f"the wheel needs packages the lock does not pin: {unpinned}; run `make lock`"


def test_the_image_venv_is_the_lock(installed_with_monitor: Installed) -> None:
    assert installed_versions(installed_with_monitor) == lock_pins(LOCK)


# ---- the wheel itself -------------------------------------------------------------------------------


def test_wheel_ships_the_package_the_entry_point_and_the_extra(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
    assert {
        "worker/__init__.py",
        "worker/cli.py",
        "worker/azure_monitor.py",
        "worker/storage/__init__.py",
    } <= names
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
    assert "worker = worker.cli:main" in entry_points
    assert "Provides-Extra: azure-monitor" in metadata
    assert "azure-monitor-opentelemetry-exporter" in metadata
    print("package timings (s):", installed.timings)


def test_the_venv_is_clean_and_runs_as_an_unprivileged_user(installed: Installed) -> None:
    script = textwrap.dedent(
        """
        import importlib.util, json, os, sys
        print(json.dumps({
            "uid": os.geteuid(),
            "prefix": sys.prefix,
            "dev": [m for m in ("pytest", "ruff", "trustme") if importlib.util.find_spec(m)],
            "opentelemetry": importlib.util.find_spec("opentelemetry") is not None,
        }))
        """
    )
    done = installed.run(installed.python, "-c", script)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    if os.geteuid() == 0:
        assert facts["uid"] == pwd.getpwnam("nobody").pw_uid
    assert facts["uid"] != 0
    assert facts["prefix"] == str(installed.venv)
    assert facts["dev"] == []  # nothing leaks in from the test environment
    assert facts["opentelemetry"] is False  # the azure-monitor extra is optional


# ---- the commands, as the image runs them -------------------------------------------------------------


def test_help_lists_run_and_doctor(installed: Installed) -> None:
    done = installed.run(installed.worker, "--help")
    assert done.returncode == 0, done.stderr
    commands = [line.strip(" │").split()[0] for line in done.stdout.splitlines() if line.startswith("│ ")]
    assert "run" in commands
    assert "doctor" in commands


def test_doctor_with_nothing_configured_exits_2_and_names_the_endpoint_variable(installed: Installed) -> None:
    env: dict[str, str] = {}
    if not installed.isolated:
        # No network namespace to contain it: keep DefaultAzureCredential off the metadata service.
        env = {"AZURE_TOKEN_CREDENTIALS": "dev"}
    done = installed.run(installed.worker, "doctor", env=env, offline=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "AZURE_OPENAI_ENDPOINT" in done.stdout
    assert "FAIL" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_run_with_nothing_configured_exits_2_with_a_summary(installed: Installed) -> None:
    done = installed.run(installed.worker, "run", "--log-format", "json", offline=True)
    assert done.returncode == 2, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["event"] == "run.summary"
    assert summary["exit_code"] == 2
    assert "WORKER_SOURCE" in summary["error"]


# ---- the optional Azure Monitor extra -----------------------------------------------------------------

TELEMETRY_SCRIPT = """
from worker import logs
from worker.report import RunStats
from worker.azure_monitor import open_telemetry
from worker.settings import load_settings
logs.configure(json_lines=True)
t = open_telemetry(load_settings({}), run_id="packaged")
stats = RunStats()
t.attach(stats)
stats.latency.add(0.5)
stats.succeeded = 3
t.record_run(stats, 1.0, exit_code=0)
print(type(t).__name__, t.close(timeout_s=5))
"""


def test_without_the_extra_a_connection_string_gets_one_warning(installed: Installed) -> None:
    key = "5b3f1a2c-1111-4222-8333-944444444444"
    env = {
        "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={key};IngestionEndpoint=http://127.0.0.1:9/"
    }
    done = installed.run(installed.python, "-c", TELEMETRY_SCRIPT, env=env, offline=True)
    assert done.returncode == 0, done.stderr
    *events, last = done.stdout.strip().splitlines()
    assert last == "Telemetry True"
    [warning] = [json.loads(line) for line in events]
    assert warning["event"] == "telemetry.unavailable"
    assert warning["level"] == "warning"
    assert "aoai-batch-worker[azure-monitor]" in warning["fix"]
    assert key not in done.stdout + done.stderr


def test_with_the_extra_metrics_reach_the_ingestion_endpoint(
    installed_with_monitor: Installed, ingestion: FakeIngestion
) -> None:
    env = ingestion.environ()
    done = installed_with_monitor.run(installed_with_monitor.python, "-c", TELEMETRY_SCRIPT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "AzureMonitorTelemetry True"
    assert ingestion.total("worker.items", outcome="succeeded") == 3
    assert ingestion.total("worker.call.duration") == pytest.approx(0.5)
    assert ingestion.instrumentation_key not in done.stdout + done.stderr
    print("package timings (s):", installed_with_monitor.timings)
