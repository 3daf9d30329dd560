"""`make bench` keeps working: a tiny run prints every figure of the README's performance table (no timing is asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "overhead_ratio",
    "quota_utilisation",
    "throttled_ratio",
    "rss_ratio",
    "naive_quota_utilisation",
    "naive_throttled_ratio",
}


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
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(figures) >= FIGURES
    assert all(isinstance(figures[name], float | int) and figures[name] >= 0 for name in FIGURES)
    assert "overhead_ratio (≥ 0.85)" in done.stdout  # the table is printed too
