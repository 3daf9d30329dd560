"""`make bench`: throughput overhead, quota utilisation and memory of `worker run`, on the local stack.

Everything runs on 127.0.0.1 against the project's fake Azure OpenAI (tests/stack), with the managed-identity
environment of `stack.worker_env()`. Phases:

1. Overhead (zero latency, unlimited quota): the same N_OVERHEAD prompts through (a) a bare loop —
   AsyncAzureOpenAI + DefaultAioHttpClient + one aio token provider, CONCURRENCY tasks calling
   `chat.completions.create` — and (b) `worker run` as a subprocess, local folder source (one .jsonl) and
   local sink, same concurrency. The worker's time is its own `run.summary` `duration_s` (from before its
   clients open until its manifest is written: interpreter start-up and imports excluded); the bare loop's
   is from before its client opens until the last answer. Interleaved BENCH_REPS times, best of each.
   A local sink, not blob: the bench compares the worker's own overhead with the SDK's; Azurite (Node)
   would compete for the same two cores and add storage time the bare loop does not have.
2. Quota (fake tpm=60,000, rpm=6,000, 300 ms + 2 ms/completion token + 0–200 ms jitter): `worker run` with
   no --tpm (the limit is learned from x-ratelimit-remaining-*), then a naive loop (fixed concurrency,
   the SDK's default max_retries=2, no budget). The served rate comes from the fake's tokens_by_second over
   the busy window: from 10 s after the first served second to 3 s before the last (start-up, learning and
   the tail of in-flight calls left out). max_tokens equals the fake's echo length, so served tokens
   (prompt + completion, what tokens_by_second counts) equal what the quota charges (prompt + max_tokens).
3. Memory: the worker's peak RSS on N_SMALL vs N_LARGE prompts (zero latency, one .jsonl each of short
   prompts, so that 1,000,000 lines stay under the worker's 200 MB .jsonl limit), each measured by a fresh
   wrapper process with resource.getrusage(RUSAGE_CHILDREN). 100,000 vs 1,000,000, the README's rss_ratio
   (~18 of the ~22 minutes); BENCH_QUICK=1 runs 20,000 vs 200,000 instead.

4. Pool (`pool2`, issue 12): two deployments of POOL2_TPM tokens a minute each (the fake's per-deployment
   quotas, the same latency as phase 2) as one pool (`AZURE_OPENAI_DEPLOYMENTS=pool2-a,pool2-b`: priority
   in that order, limits learned from headers), N_POOL2 prompts. The served rate of the pool (both
   deployments, over the busy window) ÷ 2 × POOL2_TPM, the 429 ratio and each deployment's share.

The machine has two cores: the fake server and the worker compete for them, so absolute rates are lower
than on a real deployment; the ratios are what the bench is for. The last stdout line is one JSON object.

Knobs: BENCH_CASES (overhead,quota,memory,pool2: a comma-separated subset runs only those; the first three
come as one), BENCH_QUICK=1, BENCH_REPS (2), BENCH_CONCURRENCY (32), BENCH_QUOTA_SECONDS (80), BENCH_SCALE (1;
e.g. 0.05 for a smoke run), BENCH_WORKER_PATH (a directory put first on the worker's PYTHONPATH: bench
another build of the `worker` package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = ROOT / ".bench"
DEPLOYMENT = "gpt-4o-mini"
OPENAI_SCOPE = "https://cognitiveservices.azure.com/.default"

QUOTA_TPM = 60_000
QUOTA_RPM = 6_000
QUOTA_LATENCY = {"latency_ms": 300.0, "latency_per_token_ms": 2.0, "jitter_ms": 200.0}
POOL2_TPM = 30_000  # each of the pool's two deployments
POOL2_DEPLOYMENTS = ("pool2-a", "pool2-b")
N_POOL2 = 800
CORE_CASES = ("overhead", "quota", "memory")
RAMP_SECONDS = 10  # left out at the start of the busy window
TAIL_SECONDS = 3  # left out at its end


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- inputs -----------------------------------------------------------------------------------------


def echo_tokens(content: str) -> int:
    """Completion tokens of the fake's answer ("ECHO: " + the user message), as it counts them."""
    return math.ceil((len("ECHO: ") + len(content)) / 4)


def write_prompts(path: Path, count: int, *, seed: int, min_chars: int, max_chars: int) -> int:
    """A Batch API .jsonl of `count` chat requests; returns the tokens the quota charges for all of them."""
    rng = random.Random(seed)
    words = ("the", "invoice", "ticket", "customer", "refund", "order", "delayed", "asks", "about", "status")
    charged = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for index in range(count):
            length = rng.randint(min_chars, max_chars)
            text = f"Summarise ticket {index}:"
            while len(text) < length:
                text += " " + rng.choice(words)
            text = text[:length]
            max_tokens = echo_tokens(text)
            charged += math.ceil(len(text) / 4) + max_tokens
            line = {
                "custom_id": f"item-{index:07d}",
                "method": "POST",
                "url": "/chat/completions",
                "body": {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens},
            }
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
    return charged


# ---- child processes ------------------------------------------------------------------------------


def measured(argv: list[str], *, env: dict[str, str], cwd: Path, stdout: Path) -> dict[str, Any]:
    """Run `argv` under a fresh wrapper process that reports the child's peak RSS and CPU time."""
    report = stdout.with_suffix(".measure.json")
    wrapper = [
        sys.executable,
        "-m",
        "scripts.bench",
        "measure",
        "--report",
        str(report),
        "--stdout",
        str(stdout),
    ]
    subprocess.run([*wrapper, "--", *argv], env=env, cwd=cwd, check=True)
    return dict(json.loads(report.read_text()))


def measure_child(report: Path, stdout: Path, argv: list[str]) -> int:
    """`python -m scripts.bench measure`: run argv, then write its peak RSS (RUSAGE_CHILDREN) and CPU."""
    started = time.perf_counter()
    with stdout.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report.write_text(
        json.dumps(
            {
                "returncode": code,
                "wall_s": wall,
                "maxrss_mb": usage.ru_maxrss / 1024,  # kilobytes on Linux
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )
    return 0


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), to show what the fake server itself burned."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the bare SDK loop ----------------------------------------------------------------------------


async def bare_loop(
    bodies: list[dict[str, Any]], concurrency: int, max_retries: int | None
) -> dict[str, Any]:
    import ssl

    import httpx2
    import openai
    from azure.identity.aio import ManagedIdentityCredential, get_bearer_token_provider

    context = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
    served: list[float] = []
    failures: dict[str, int] = {}
    started = time.perf_counter()
    async with ManagedIdentityCredential(client_id=os.environ.get("AZURE_CLIENT_ID")) as credential:
        limits = httpx2.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
        options: dict[str, Any] = {} if max_retries is None else {"max_retries": max_retries}
        client = openai.AsyncAzureOpenAI(
            azure_endpoint=os.environ["AZURE_OPENAI_ENDPOINT"],
            api_version=os.environ["OPENAI_API_VERSION"],
            azure_ad_token_provider=get_bearer_token_provider(credential, OPENAI_SCOPE),
            http_client=openai.DefaultAioHttpClient(verify=context, limits=limits),
            **options,
        )
        work = iter(bodies)

        async def one_task() -> None:
            for body in work:
                try:
                    await client.chat.completions.create(
                        model=os.environ["AZURE_OPENAI_DEPLOYMENT"],
                        messages=body["messages"],
                        max_tokens=body["max_tokens"],
                    )
                except openai.APIError as error:
                    name = type(error).__name__
                    failures[name] = failures.get(name, 0) + 1
                else:
                    served.append(time.perf_counter())

        try:
            await asyncio.gather(*(one_task() for _ in range(concurrency)))
        finally:
            await client.close()
    elapsed = time.perf_counter() - started
    return {
        "elapsed_s": elapsed,
        "succeeded": len(served),
        "failed": sum(failures.values()),
        "failures": failures,
    }


def bare_child(prompts: Path, concurrency: int, max_retries: int | None, out: Path) -> int:
    """`python -m scripts.bench bare`: the bare loop in its own process; result as JSON in `out`."""
    bodies = [json.loads(line)["body"] for line in prompts.read_text(encoding="utf-8").splitlines()]
    out.write_text(json.dumps(asyncio.run(bare_loop(bodies, concurrency, max_retries))))
    return 0


# ---- the bench ------------------------------------------------------------------------------------


class Bench:
    def __init__(self) -> None:
        self.quick = os.environ.get("BENCH_QUICK") == "1"
        self.reps = int(os.environ.get("BENCH_REPS", "2"))
        self.concurrency = int(os.environ.get("BENCH_CONCURRENCY", "32"))
        self.quota_seconds = float(os.environ.get("BENCH_QUOTA_SECONDS", "80"))
        self.worker_path = os.environ.get("BENCH_WORKER_PATH") or None
        self.n_overhead = 20_000
        self.n_small, self.n_large = (20_000, 200_000) if self.quick else (100_000, 1_000_000)
        scale = float(os.environ.get("BENCH_SCALE", "1"))
        if scale != 1:
            self.n_overhead, self.n_small, self.n_large = (
                max(100, int(n * scale)) for n in (self.n_overhead, self.n_small, self.n_large)
            )
        self.fakes_pid = 0
        self.result: dict[str, Any] = {}
        self.cases = {case.strip() for case in os.environ.get("BENCH_CASES", "").split(",") if case.strip()}
        self.cases = self.cases or {*CORE_CASES, "pool2"}
        self.n_pool2 = N_POOL2 if scale == 1 else max(40, int(N_POOL2 * scale))

    # -- helpers --

    def worker_env(self, stack: Any) -> dict[str, str]:
        env = {**stack.worker_env("managed-identity"), "WORKER_LOG_FORMAT": "json"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.worker_path, str(ROOT)) if p)
        return env

    def run_worker(
        self, stack: Any, name: str, prompts: Path, *extra: str, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        run_dir = WORKDIR / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        source = run_dir / "source"
        source.mkdir()
        os.link(prompts, source / "prompts.jsonl")
        argv = [
            sys.executable, "-m", "worker", "run",
            "--source", str(source), "--sink", str(run_dir / "sink"),
            "--concurrency", str(self.concurrency), "--run-id", name, *extra,
        ]  # fmt: skip
        fake_cpu = process_cpu_seconds(self.fakes_pid)
        environment = {**self.worker_env(stack), **(env or {})}
        measure = measured(argv, env=environment, cwd=run_dir, stdout=run_dir / "worker.out")
        fake_cpu_after = process_cpu_seconds(self.fakes_pid)
        lines = (run_dir / "worker.out").read_text().strip().splitlines()
        summary = json.loads(lines[-1])
        expected = sum(1 for _ in prompts.open("rb"))
        if (
            summary.get("event") != "run.summary"
            or summary.get("exit_code") != 0
            or summary.get("succeeded") != expected
        ):
            raise RuntimeError(f"worker run {name}: expected {expected} successes, got {lines[-1][:2000]}")
        measure["summary"] = summary
        if fake_cpu is not None and fake_cpu_after is not None:
            measure["fake_cpu_s"] = fake_cpu_after - fake_cpu
        shutil.rmtree(source)
        shutil.rmtree(run_dir / "sink", ignore_errors=True)  # up to ~0.6 GB of results at 1M prompts
        return measure

    def run_bare(self, stack: Any, name: str, prompts: Path, max_retries: int | None) -> dict[str, Any]:
        run_dir = WORKDIR / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        out = run_dir / "bare.json"
        argv = [
            sys.executable, "-m", "scripts.bench", "bare", "--prompts", str(prompts),
            "--concurrency", str(self.concurrency), "--out", str(out),
        ]  # fmt: skip
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        fake_cpu = process_cpu_seconds(self.fakes_pid)
        env = {**stack.worker_env("managed-identity"), "PYTHONPATH": str(ROOT)}
        measure = measured(argv, env=env, cwd=ROOT, stdout=run_dir / "bare.out")
        fake_cpu_after = process_cpu_seconds(self.fakes_pid)
        measure.update(json.loads(out.read_text()))
        if fake_cpu is not None and fake_cpu_after is not None:
            measure["fake_cpu_s"] = fake_cpu_after - fake_cpu
        return measure

    def which_worker(self, stack: Any) -> str:
        probe = subprocess.run(
            [sys.executable, "-c", "import worker; print(worker.__file__)"],
            env=self.worker_env(stack),
            cwd=WORKDIR,
            capture_output=True,
            text=True,
            check=True,
        )
        return str(Path(probe.stdout.strip()).parent)

    # -- phases --

    def overhead(self, stack: Any) -> dict[str, Any]:
        prompts = WORKDIR / "inputs" / f"overhead-{self.n_overhead}.jsonl"
        write_prompts(prompts, self.n_overhead, seed=1, min_chars=100, max_chars=400)
        stack.openai.reset()
        bare_runs, worker_runs = [], []
        for rep in range(self.reps):
            log(f"overhead rep {rep + 1}/{self.reps}: bare SDK loop, {self.n_overhead} prompts")
            bare_runs.append(self.run_bare(stack, f"bare-{rep}", prompts, max_retries=0))
            log(f"overhead rep {rep + 1}/{self.reps}: worker run, {self.n_overhead} prompts")
            worker_runs.append(self.run_worker(stack, f"overhead-{rep}", prompts))
        for run in bare_runs:
            if run["failed"]:
                raise RuntimeError(f"the bare loop had failures: {run['failures']}")
        bare = min(bare_runs, key=lambda r: r["elapsed_s"])
        worker = min(worker_runs, key=lambda r: r["summary"]["duration_s"])
        bare_rate = self.n_overhead / bare["elapsed_s"]
        worker_rate = self.n_overhead / worker["summary"]["duration_s"]
        return {
            "bare": bare,
            "worker": worker,
            "bare_rates": [round(self.n_overhead / r["elapsed_s"], 1) for r in bare_runs],
            "worker_rates": [round(self.n_overhead / r["summary"]["duration_s"], 1) for r in worker_runs],
            "bare_req_per_s": bare_rate,
            "worker_prompts_per_s": worker_rate,
            "overhead_ratio": worker_rate / bare_rate,
        }

    def quota_inputs(self) -> tuple[Path, int]:
        average_cost = 2 * (200 + 800) / 2 / 4  # prompt ≈ completion ≈ chars/4, chars uniform in [200, 800]
        count = math.ceil(QUOTA_TPM / 60 * self.quota_seconds / average_cost)
        prompts = WORKDIR / "inputs" / f"quota-{count}.jsonl"
        charged = write_prompts(prompts, count, seed=2, min_chars=200, max_chars=800)
        return prompts, charged

    def configure_quota(self, stack: Any) -> None:
        stack.openai.reset()
        stack.openai.configure(tpm=QUOTA_TPM, rpm=QUOTA_RPM, **QUOTA_LATENCY)

    @staticmethod
    def served(stats: dict[str, Any]) -> dict[str, Any]:
        by_second = {int(second): tokens for second, tokens in stats["tokens_by_second"].items()}
        first, last = min(by_second), max(by_second)
        busy = range(first + RAMP_SECONDS, last - TAIL_SECONDS + 1)
        if len(busy) < 5:  # a short smoke run (BENCH_SCALE): no steady state to cut out, use every second
            busy = range(first, last + 1)
        tokens = sum(by_second.get(second, 0) for second in busy)
        per_minute = tokens / len(busy) * 60
        return {
            "busy_seconds": len(busy),
            "served_tpm": per_minute,
            "quota_utilisation": per_minute / QUOTA_TPM,
            "throttled_ratio": stats["throttled"] / max(1, stats["requests"]),
            "requests": stats["requests"],
            "throttled": stats["throttled"],
            "active_seconds": last - first + 1,
        }

    def quota(self, stack: Any) -> dict[str, Any]:
        prompts, charged = self.quota_inputs()
        count = sum(1 for _ in prompts.open(encoding="utf-8"))
        log(f"quota: worker run (limit learned from headers), {count} prompts ≈ {charged} tokens")
        self.configure_quota(stack)
        worker = self.run_worker(stack, "quota-worker", prompts)
        worker.update(self.served(stack.openai.stats()))
        log(f"quota: naive loop (concurrency {self.concurrency}, SDK default retries, no budget)")
        self.configure_quota(stack)
        naive = self.run_bare(stack, "quota-naive", prompts, max_retries=None)
        naive.update(self.served(stack.openai.stats()))
        return {"prompts": count, "charged_tokens": charged, "worker": worker, "naive": naive}

    def memory(self, stack: Any) -> dict[str, Any]:
        stack.openai.reset()
        runs: dict[int, dict[str, Any]] = {}
        for count in (self.n_small, self.n_large):
            prompts = WORKDIR / "inputs" / f"memory-{count}.jsonl"
            # One file, as large as the worker takes (.jsonl ≤ 200 MB, as the Batch API): ~190 bytes a line.
            write_prompts(prompts, count, seed=3, min_chars=20, max_chars=60)
            log(f"memory: worker run, {count} prompts")
            runs[count] = self.run_worker(stack, f"memory-{count}", prompts)
            prompts.unlink()
        small, large = runs[self.n_small], runs[self.n_large]
        return {
            "small": small,
            "large": large,
            "rss_ratio": large["maxrss_mb"] / small["maxrss_mb"],
            "scale": f"{self.n_small:,} vs {self.n_large:,} prompts",
        }

    def pool2(self, stack: Any) -> dict[str, Any]:
        """Phase 4: two deployments of POOL2_TPM each as one pool (see the module docstring)."""
        # chars uniform in [80, 220]: ≈ 75 tokens charged a prompt, 800 prompts ≈ one minute at 60,000 TPM
        prompts = WORKDIR / "inputs" / f"pool2-{self.n_pool2}.jsonl"
        charged = write_prompts(prompts, self.n_pool2, seed=4, min_chars=80, max_chars=220)
        stack.openai.reset()
        stack.openai.configure(
            deployments=[*POOL2_DEPLOYMENTS, DEPLOYMENT],
            deployment_limits={name: {"tpm": POOL2_TPM} for name in POOL2_DEPLOYMENTS},
            **QUOTA_LATENCY,
        )
        log(f"pool2: worker run, {self.n_pool2} prompts ≈ {charged} tokens, 2 × {POOL2_TPM} TPM")
        env = {"AZURE_OPENAI_DEPLOYMENTS": ",".join(POOL2_DEPLOYMENTS), "AZURE_OPENAI_DEPLOYMENT": "pool"}
        worker = self.run_worker(stack, "pool2", prompts, env=env)
        stats = stack.openai.stats()
        measured_rate = self.served(stats)
        pooled = 2 * POOL2_TPM
        by_status = stats["by_deployment_status"]
        per_deployment = {name: by_status.get(f"{name} 200", 0) for name in POOL2_DEPLOYMENTS}
        return {
            "prompts": self.n_pool2,
            "charged_tokens": charged,
            "worker": worker,
            **measured_rate,
            "pool_utilisation": measured_rate["served_tpm"] / pooled,
            "served_by_deployment": per_deployment,
            "both_used": all(count > 0 for count in per_deployment.values()),
            "summary_deployments": worker["summary"].get("deployments", {}),
        }

    def report_pool2(self, pool2: dict[str, Any]) -> None:
        """The pool2 rows, then the last line: every figure of this run as one JSON object."""
        rows = [
            ("pool2", "prompts / charged tokens", f"{pool2['prompts']} / {pool2['charged_tokens']}"),
            ("pool2", "served TPM, both deployments (busy s)", f"{pool2['served_tpm']:.0f} ({pool2['busy_seconds']} s)"),
            ("pool2", f"pool_utilisation ÷ 2 × {POOL2_TPM:,} (≥ 0.85)", f"{pool2['pool_utilisation']:.3f}"),
            ("pool2", "throttled_ratio (≤ 0.05)", f"{pool2['throttled_ratio']:.4f} ({pool2['throttled']}/{pool2['requests']})"),
            ("pool2", "served by deployment", ", ".join(f"{k} {v}" for k, v in pool2["served_by_deployment"].items())),
            ("pool2", "worker wall s", f"{pool2['worker']['summary']['duration_s']:.1f}"),
        ]  # fmt: skip
        width = max(len(label) for _, label, _ in rows)
        if not self.result:
            print(f"{'phase':<9} {'measure':<{width}}  value")
            print(f"{'-' * 9} {'-' * width}  {'-' * 30}")
        for phase, label, value in rows:
            print(f"{phase:<9} {label:<{width}}  {value}")
        self.result = {
            **self.result,
            "pool2_utilisation": round(pool2["pool_utilisation"], 4),
            "pool2_throttled_ratio": round(pool2["throttled_ratio"], 4),
            "pool2_both_used": pool2["both_used"],
            "pool2_served_by_deployment": pool2["served_by_deployment"],
        }
        print(json.dumps(self.result))

    def run(self) -> dict[str, Any]:
        from tests.stack import LocalStack

        shutil.rmtree(WORKDIR, ignore_errors=True)
        WORKDIR.mkdir(parents=True)
        started = time.monotonic()
        log("starting the local stack")
        with LocalStack(WORKDIR / "stack") as stack:
            self.fakes_pid = json.loads((WORKDIR / "stack" / "fakes-ready.json").read_text())["pid"]
            worker_from = self.which_worker(stack)
            log(f"worker package: {worker_from}")
            core = self.cases & set(CORE_CASES)
            if core:
                overhead = self.overhead(stack)
                quota = self.quota(stack)
                memory = self.memory(stack)
            pool2 = self.pool2(stack) if "pool2" in self.cases else None
        if core:
            self.report(overhead, quota, memory, worker_from, time.monotonic() - started)
        if pool2 is not None:
            self.report_pool2(pool2)
        return self.result

    # -- output --

    def report(
        self,
        overhead: dict[str, Any],
        quota: dict[str, Any],
        memory: dict[str, Any],
        worker_from: str,
        total_s: float,
    ) -> None:
        bare, worker = overhead["bare"], overhead["worker"]
        qw, qn = quota["worker"], quota["naive"]
        per_request_ms = lambda run, n: 1000 * run["cpu_s"] / n  # noqa: E731
        rows = [
            ("overhead", "bare SDK loop req/s (runs)", f"{overhead['bare_req_per_s']:.0f} {overhead['bare_rates']}"),
            ("overhead", "worker prompts/s (runs)", f"{overhead['worker_prompts_per_s']:.0f} {overhead['worker_rates']}"),
            ("overhead", "overhead_ratio (≥ 0.85)", f"{overhead['overhead_ratio']:.3f}"),
            ("overhead", "CPU ms/request bare | worker", f"{per_request_ms(bare, self.n_overhead):.2f} | {per_request_ms(worker, self.n_overhead):.2f}"),
            ("overhead", "fake server CPU s bare | worker", f"{bare.get('fake_cpu_s', 0):.1f} | {worker.get('fake_cpu_s', 0):.1f}"),
            ("overhead", "worker start-up s (wall - duration)", f"{worker['wall_s'] - worker['summary']['duration_s']:.2f}"),
            ("quota", "prompts / charged tokens", f"{quota['prompts']} / {quota['charged_tokens']}"),
            ("quota", "worker served TPM (busy s)", f"{qw['served_tpm']:.0f} ({qw['busy_seconds']} s)"),
            ("quota", "worker quota_utilisation (≥ 0.95)", f"{qw['quota_utilisation']:.3f}"),
            ("quota", "worker throttled_ratio (≤ 0.02)", f"{qw['throttled_ratio']:.4f} ({qw['throttled']}/{qw['requests']})"),
            ("quota", "worker wall s / failed items", f"{qw['summary']['duration_s']:.1f} / {qw['summary']['failed']}"),
            ("quota", "naive served TPM (busy s)", f"{qn['served_tpm']:.0f} ({qn['busy_seconds']} s)"),
            ("quota", "naive quota_utilisation", f"{qn['quota_utilisation']:.3f}"),
            ("quota", "naive throttled_ratio", f"{qn['throttled_ratio']:.4f} ({qn['throttled']}/{qn['requests']})"),
            ("quota", "naive wall s / failed items", f"{qn['elapsed_s']:.1f} / {qn['failed']}"),
            ("memory", "scale", memory["scale"]),
            ("memory", "worker peak RSS MB small | large", f"{memory['small']['maxrss_mb']:.1f} | {memory['large']['maxrss_mb']:.1f}"),
            ("memory", "rss_ratio (≤ 1.2)", f"{memory['rss_ratio']:.3f}"),
            ("memory", "large run prompts/s", f"{self.n_large / memory['large']['summary']['duration_s']:.0f}"),
        ]  # fmt: skip
        width = max(len(label) for _, label, _ in rows)
        print(f"{'phase':<9} {'measure':<{width}}  value")
        print(f"{'-' * 9} {'-' * width}  {'-' * 30}")
        for phase, label, value in rows:
            print(f"{phase:<9} {label:<{width}}  {value}")
        print(
            f"\nworker package: {worker_from}; concurrency {self.concurrency}; 2 cores shared with the fake server"
        )
        print(f"total bench time: {total_s:.0f} s")
        self.result = {
            "overhead_ratio": round(overhead["overhead_ratio"], 4),
            "quota_utilisation": round(qw["quota_utilisation"], 4),
            "throttled_ratio": round(qw["throttled_ratio"], 4),
            "rss_ratio": round(memory["rss_ratio"], 4),
            "naive_quota_utilisation": round(qn["quota_utilisation"], 4),
            "naive_throttled_ratio": round(qn["throttled_ratio"], 4),
            "naive_failed_items": qn["failed"],
            "worker_prompts_per_s": round(overhead["worker_prompts_per_s"], 1),
            "bare_req_per_s": round(overhead["bare_req_per_s"], 1),
            "rss_scale": memory["scale"],
            "rss_mb": [round(memory["small"]["maxrss_mb"], 1), round(memory["large"]["maxrss_mb"], 1)],
            "timing": "worker: run.summary duration_s (start-up excluded); bare: client open to last answer",
            "sink": "local folder",
            "busy_window": f"first served second +{RAMP_SECONDS} s to last -{TAIL_SECONDS} s",
            "worker_package": worker_from,
        }
        print(json.dumps(self.result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    measure = sub.add_parser("measure", help="internal: run a command, report its peak RSS and CPU")
    measure.add_argument("--report", type=Path, required=True)
    measure.add_argument("--stdout", type=Path, required=True)
    measure.add_argument("argv", nargs=argparse.REMAINDER)
    bare = sub.add_parser("bare", help="internal: the bare AsyncAzureOpenAI loop")
    bare.add_argument("--prompts", type=Path, required=True)
    bare.add_argument("--concurrency", type=int, required=True)
    bare.add_argument("--max-retries", type=int, default=None)
    bare.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure_child(args.report, args.stdout, [a for a in args.argv if a != "--"])
    if args.command == "bare":
        return bare_child(args.prompts, args.concurrency, args.max_retries, args.out)
    Bench().run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
