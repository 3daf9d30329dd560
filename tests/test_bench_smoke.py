"""`make bench` keeps working: a tiny run prints every figure of the README's performance table (no timing is asserted)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "overhead_ratio",
    "quota_utilisation",
    "throttled_ratio",
    "rss_ratio",
    "naive_quota_utilisation",
    "naive_throttled_ratio",
    "pool2_utilisation",
    "pool2_throttled_ratio",
}
CASES = {"longlat", "replicas3", "noheaders"}  # each a JSON object of its own figures


def test_bench_smoke_run_prints_every_figure_as_its_last_line() -> None:
    env = {
        **os.environ,
        "BENCH_SCALE": "0.02",
        "BENCH_QUICK": "1",  # memory phase: 400 vs 4,000 prompts
        "BENCH_QUOTA_SECONDS": "8",
        "BENCH_REPS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    *table, last = done.stdout.strip().splitlines()
    figures = json.loads(last)
    assert set(figures) >= FIGURES, FIGURES - set(figures)
    for name in FIGURES:
        value = figures[name]
        assert type(value) in (int, float) and math.isfinite(value), f"{name}: {value!r}"
    assert set(figures) >= CASES, CASES - set(figures)
    for case in CASES:
        for name in ("quota_utilisation", "throttled_ratio"):
            value = figures[case][name]
            assert type(value) in (int, float) and math.isfinite(value), f"{case}.{name}: {value!r}"
    shares = figures["replicas3"]["shares"]
    assert len(shares) == 3 and sum(shares) == pytest.approx(1.0, abs=0.01), shares
    assert any(line.split() == ["phase", "measure", "value"] for line in table), "the table is printed too"
