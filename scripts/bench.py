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

4. Where real deployments live (each case a field of the last line; `worker run` with its default,
   adaptive concurrency; served rates from the fake's counters over the busy window, as in 2):
   - `longlat`: TPM-bound (30,000 TPM, ~300 tokens a request), 11-13 s latency, tokens counted over a
     60 s window and `x-ratelimit-remaining-tokens` counting it (the public simulator's semantics), no
     `retry-after-ms`. About 150 s of work (90 with BENCH_QUICK=1).
   - `replicas3`: three `worker run` processes at once on one deployment (60,000 TPM, the quota phase's
     latency) and one source of 12 `.jsonl` files that they share through their claims; the aggregate
     rate, and each replica's share of the calls. About 90 s of work (60).
   - `noheaders`: RPM-bound (600 RPM), behind a "gateway" that strips the `x-ratelimit-*` headers: 429s
     and their retry-after are all the worker learns from. About 90 s of work (60).
   - `pool2` (issue 12): two deployments of POOL2_TPM tokens a minute each (the fake's per-deployment
     quotas, the quota phase's latency, --concurrency BENCH_CONCURRENCY) as one pool
     (`AZURE_OPENAI_DEPLOYMENTS=pool2-a,pool2-b`: priority in that order, limits learned from headers),
     N_POOL2 prompts. The pool's served rate ÷ 2 × POOL2_TPM, the 429s and each deployment's share.

The machine has two cores: the fake server and the worker compete for them, so absolute rates are lower
than on a real deployment; the ratios are what the bench is for. The last stdout line is one JSON object.

Knobs: BENCH_QUICK=1, BENCH_CASES (a comma-separated subset of overhead,quota,memory,longlat,replicas3,
noheaders,pool2; all by default), BENCH_REPS (2), BENCH_CONCURRENCY (32, phases 1-3), BENCH_QUOTA_SECONDS (80;
the cases of 4 scale their work with it), BENCH_SCALE (1; e.g. 0.05 for a smoke run), BENCH_WORKER_PATH (a
directory put first on the worker's PYTHONPATH: bench another build of the `worker` package).
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
RAMP_SECONDS = 10  # left out at the start of the busy window
TAIL_SECONDS = 3  # left out at its end

CASES = ("overhead", "quota", "memory", "longlat", "replicas3", "noheaders", "pool2")
LONGLAT_TPM = 30_000
LONGLAT_CONFIG = {
    "tpm": LONGLAT_TPM,
    "token_window_s": 60.0,
    "retry_after_ms": False,
    "latency_ms": 11_000.0,
    "jitter_ms": 2_000.0,
}
LONGLAT_RAMP_SECONDS = 20  # the first answers come after ~12 s; learning starts then
REPLICAS = 3
REPLICAS_FILES = 12
NOHEADERS_RPM = 600
POOL2_TPM = 30_000  # each of the pool's two deployments
POOL2_DEPLOYMENTS = ("pool2-a", "pool2-b")
N_POOL2 = 800


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


def rate_limits(sink: Path, run_id: str) -> dict[str, Any]:
    """What the worker's budget knew at the end of a run (its manifest's rate_limits), {} if unknown."""
    try:
        manifest = json.loads((sink / "_runs" / f"{run_id}.json").read_text())
    except (OSError, ValueError):
        return {}
    limits = manifest.get("rate_limits")
    return dict(limits) if isinstance(limits, dict) else {}


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
        cases = os.environ.get("BENCH_CASES", "")
        self.cases = [case.strip() for case in cases.split(",") if case.strip()] or list(CASES)
        unknown = set(self.cases) - set(CASES)
        if unknown:
            raise SystemExit(f"BENCH_CASES: unknown {sorted(unknown)}; known: {', '.join(CASES)}")
        self.case_scale = self.quota_seconds / 80  # the cases of phase 4 do this much of their work
        self.n_pool2 = N_POOL2 if scale == 1 else max(40, int(N_POOL2 * scale))
        self.fakes_pid = 0
        self.result: dict[str, Any] = {}

    # -- helpers --

    def worker_env(self, stack: Any) -> dict[str, str]:
        env = {**stack.worker_env("managed-identity"), "WORKER_LOG_FORMAT": "json"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.worker_path, str(ROOT)) if p)
        return env

    def run_worker(
        self,
        stack: Any,
        name: str,
        prompts: Path,
        *extra: str,
        adaptive: bool = False,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`worker run` on one .jsonl; `adaptive`: with the default --concurrency (the adaptive window);
        `env`: added to the worker's environment."""
        run_dir = WORKDIR / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        source = run_dir / "source"
        source.mkdir()
        os.link(prompts, source / "prompts.jsonl")
        concurrency = [] if adaptive else ["--concurrency", str(self.concurrency)]
        argv = [
            sys.executable, "-m", "worker", "run",
            "--source", str(source), "--sink", str(run_dir / "sink"),
            *concurrency, "--run-id", name, *extra,
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
        measure["rate_limits"] = rate_limits(run_dir / "sink", name)
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
    def served(
        stats: dict[str, Any],
        limit: float = QUOTA_TPM,
        *,
        counter: str = "tokens_by_second",
        ramp: int = RAMP_SECONDS,
    ) -> dict[str, Any]:
        """The served rate (tokens, or successes with counter="successes_by_second", a minute) over the
        busy window, as a fraction of `limit`, and the 429s."""
        by_second = {int(second): tokens for second, tokens in stats[counter].items()}
        first, last = min(by_second), max(by_second)
        busy = range(first + ramp, last - TAIL_SECONDS + 1)
        if len(busy) < 5:  # a short smoke run (BENCH_SCALE): no steady state to cut out, use every second
            busy = range(first, last + 1)
        tokens = sum(by_second.get(second, 0) for second in busy)
        per_minute = tokens / len(busy) * 60
        return {
            "busy_seconds": len(busy),
            "served_tpm": per_minute,
            "quota_utilisation": per_minute / limit,
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

    def case_prompts(self, name: str, seconds: float, tpm: float, min_chars: int, max_chars: int) -> Path:
        """Prompts that keep a `tpm` quota busy for about `seconds` × the case scale."""
        average_cost = 2 * (min_chars + max_chars) / 2 / 4
        count = max(10, math.ceil(tpm / 60 * seconds * self.case_scale / average_cost))
        prompts = WORKDIR / "inputs" / f"{name}-{count}.jsonl"
        write_prompts(prompts, count, seed=4, min_chars=min_chars, max_chars=max_chars)
        return prompts

    def longlat(self, stack: Any) -> dict[str, Any]:
        prompts = self.case_prompts("longlat", 90 if self.quick else 150, LONGLAT_TPM, 400, 800)
        count = sum(1 for _ in prompts.open(encoding="utf-8"))
        log(f"longlat: worker run, {count} prompts, ~12 s latency, remaining-tokens over 60 s")
        stack.openai.reset()
        stack.openai.configure(**LONGLAT_CONFIG)
        run = self.run_worker(stack, "longlat", prompts, adaptive=True)
        run.update(self.served(stack.openai.stats(), LONGLAT_TPM, ramp=LONGLAT_RAMP_SECONDS))
        return run

    def noheaders(self, stack: Any) -> dict[str, Any]:
        average_cost = 2 * (200 + 800) / 2 / 4
        prompts = self.case_prompts(
            "noheaders", 60 if self.quick else 90, NOHEADERS_RPM * average_cost, 200, 800
        )
        count = sum(1 for _ in prompts.open(encoding="utf-8"))
        log(f"noheaders: worker run, {count} prompts, {NOHEADERS_RPM} RPM, no x-ratelimit-* headers")
        stack.openai.reset()
        stack.openai.configure(rpm=NOHEADERS_RPM, rate_headers=False, **QUOTA_LATENCY)
        run = self.run_worker(stack, "noheaders", prompts, adaptive=True)
        run.update(self.served(stack.openai.stats(), NOHEADERS_RPM, counter="successes_by_second"))
        return run

    def replicas3(self, stack: Any) -> dict[str, Any]:
        """Three `worker run` processes at once on one source and sink, one deployment."""
        prompts = self.case_prompts("replicas3", 60 if self.quick else 90, QUOTA_TPM, 200, 800)
        lines = prompts.read_text(encoding="utf-8").splitlines(keepends=True)
        run_dir = WORKDIR / "runs" / "replicas3"
        shutil.rmtree(run_dir, ignore_errors=True)
        source, sink = run_dir / "source", run_dir / "sink"
        source.mkdir(parents=True)
        for index in range(REPLICAS_FILES):
            (source / f"part-{index:02d}.jsonl").write_text("".join(lines[index::REPLICAS_FILES]))
        log(f"replicas3: {REPLICAS} worker runs at once, {len(lines)} prompts in {REPLICAS_FILES} files")
        stack.openai.reset()
        stack.openai.configure(tpm=QUOTA_TPM, rpm=QUOTA_RPM, **QUOTA_LATENCY)
        env = self.worker_env(stack)
        outputs, processes = [], []
        for replica in range(REPLICAS):
            out = run_dir / f"replica-{replica}.out"
            argv = [
                sys.executable, "-m", "worker", "run", "--source", str(source), "--sink", str(sink),
                "--run-id", f"replica-{replica}",
            ]  # fmt: skip
            with out.open("wb") as stdout:
                processes.append(
                    subprocess.Popen(argv, env=env, cwd=run_dir, stdout=stdout, stderr=subprocess.STDOUT)
                )
            outputs.append(out)
        for process in processes:
            process.wait(timeout=1800)
        summaries = [json.loads(out.read_text().strip().splitlines()[-1]) for out in outputs]
        succeeded = [summary.get("succeeded", 0) for summary in summaries]
        if sum(succeeded) != len(lines) or any(summary.get("exit_code") != 0 for summary in summaries):
            raise RuntimeError(f"replicas3: expected {len(lines)} successes in all, got {summaries}")
        stats = stack.openai.stats()
        (run_dir / "openai-stats.json").write_text(json.dumps(stats))  # the timeline, to look into
        run = self.served(stats)
        run.update(
            {
                "prompts": len(lines),
                "summaries": summaries,
                "shares": [round(n / len(lines), 3) for n in succeeded],
                "rate_limits": [rate_limits(sink, f"replica-{i}") for i in range(REPLICAS)],
            }
        )
        shutil.rmtree(sink, ignore_errors=True)
        return run

    def pool2(self, stack: Any) -> dict[str, Any]:
        """Two deployments of POOL2_TPM each as one pool (see the module docstring)."""
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
        run = self.run_worker(stack, "pool2", prompts, env=env)
        stats = stack.openai.stats()
        run.update(self.served(stats, 2 * POOL2_TPM))
        by_status = stats["by_deployment_status"]
        run["prompts"], run["charged_tokens"] = self.n_pool2, charged
        run["served_by_deployment"] = {name: by_status.get(f"{name} 200", 0) for name in POOL2_DEPLOYMENTS}
        return run

    def run(self) -> dict[str, Any]:
        from tests.stack import LocalStack

        shutil.rmtree(WORKDIR, ignore_errors=True)
        WORKDIR.mkdir(parents=True)
        started = time.monotonic()
        log(f"starting the local stack; cases: {', '.join(self.cases)}")
        phases: dict[str, dict[str, Any]] = {}
        with LocalStack(WORKDIR / "stack") as stack:
            self.fakes_pid = json.loads((WORKDIR / "stack" / "fakes-ready.json").read_text())["pid"]
            worker_from = self.which_worker(stack)
            log(f"worker package: {worker_from}")
            for case in self.cases:
                phases[case] = getattr(self, case)(stack)
        self.report(phases, worker_from, time.monotonic() - started)
        return self.result

    # -- output --

    def report(self, phases: dict[str, dict[str, Any]], worker_from: str, total_s: float) -> None:
        rows: list[tuple[str, str, str]] = []
        self.result = {}
        per_request_ms = lambda run, n: 1000 * run["cpu_s"] / n  # noqa: E731
        if (overhead := phases.get("overhead")) is not None:
            bare, worker = overhead["bare"], overhead["worker"]
            rows += [
                ("overhead", "bare SDK loop req/s (runs)", f"{overhead['bare_req_per_s']:.0f} {overhead['bare_rates']}"),
                ("overhead", "worker prompts/s (runs)", f"{overhead['worker_prompts_per_s']:.0f} {overhead['worker_rates']}"),
                ("overhead", "overhead_ratio (≥ 1.0)", f"{overhead['overhead_ratio']:.3f}"),
                ("overhead", "CPU ms/request bare | worker", f"{per_request_ms(bare, self.n_overhead):.2f} | {per_request_ms(worker, self.n_overhead):.2f}"),
                ("overhead", "fake server CPU s bare | worker", f"{bare.get('fake_cpu_s', 0):.1f} | {worker.get('fake_cpu_s', 0):.1f}"),
                ("overhead", "worker start-up s (wall - duration)", f"{worker['wall_s'] - worker['summary']['duration_s']:.2f}"),
            ]  # fmt: skip
            self.result.update(
                {
                    "overhead_ratio": round(overhead["overhead_ratio"], 4),
                    "worker_prompts_per_s": round(overhead["worker_prompts_per_s"], 1),
                    "bare_req_per_s": round(overhead["bare_req_per_s"], 1),
                }
            )
        if (quota := phases.get("quota")) is not None:
            qw, qn = quota["worker"], quota["naive"]
            rows += [
                ("quota", "prompts / charged tokens", f"{quota['prompts']} / {quota['charged_tokens']}"),
                ("quota", "worker served TPM (busy s)", f"{qw['served_tpm']:.0f} ({qw['busy_seconds']} s)"),
                ("quota", "worker quota_utilisation (≥ 0.95)", f"{qw['quota_utilisation']:.3f}"),
                ("quota", "worker throttled_ratio (≤ 0.02)", f"{qw['throttled_ratio']:.4f} ({qw['throttled']}/{qw['requests']})"),
                ("quota", "worker wall s / failed items", f"{qw['summary']['duration_s']:.1f} / {qw['summary']['failed']}"),
                ("quota", "naive served TPM (busy s)", f"{qn['served_tpm']:.0f} ({qn['busy_seconds']} s)"),
                ("quota", "naive quota_utilisation", f"{qn['quota_utilisation']:.3f}"),
                ("quota", "naive throttled_ratio", f"{qn['throttled_ratio']:.4f} ({qn['throttled']}/{qn['requests']})"),
                ("quota", "naive wall s / failed items", f"{qn['elapsed_s']:.1f} / {qn['failed']}"),
            ]  # fmt: skip
            self.result.update(
                {
                    "quota_utilisation": round(qw["quota_utilisation"], 4),
                    "throttled_ratio": round(qw["throttled_ratio"], 4),
                    "naive_quota_utilisation": round(qn["quota_utilisation"], 4),
                    "naive_throttled_ratio": round(qn["throttled_ratio"], 4),
                    "naive_failed_items": qn["failed"],
                }
            )
        if (memory := phases.get("memory")) is not None:
            rows += [
                ("memory", "scale", memory["scale"]),
                ("memory", "worker peak RSS MB small | large", f"{memory['small']['maxrss_mb']:.1f} | {memory['large']['maxrss_mb']:.1f}"),
                ("memory", "rss_ratio (≤ 1.2)", f"{memory['rss_ratio']:.3f}"),
                ("memory", "large run prompts/s", f"{self.n_large / memory['large']['summary']['duration_s']:.0f}"),
            ]  # fmt: skip
            self.result.update(
                {
                    "rss_ratio": round(memory["rss_ratio"], 4),
                    "rss_scale": memory["scale"],
                    "rss_mb": [
                        round(memory["small"]["maxrss_mb"], 1),
                        round(memory["large"]["maxrss_mb"], 1),
                    ],
                }
            )
        targets = {"longlat": (0.95, 0.02), "replicas3": (0.90, 0.05), "noheaders": (0.85, 0.05)}
        for case, (utilisation, throttled) in targets.items():
            run = phases.get(case)
            if run is None:
                continue
            unit = "RPM" if case == "noheaders" else "TPM"
            rows += [
                (case, f"served {unit} (busy s)", f"{run['served_tpm']:.0f} ({run['busy_seconds']} s)"),
                (case, f"quota_utilisation (≥ {utilisation})", f"{run['quota_utilisation']:.3f}"),
                (case, f"throttled_ratio (≤ {throttled})", f"{run['throttled_ratio']:.4f} ({run['throttled']}/{run['requests']})"),
            ]  # fmt: skip
            figures: dict[str, Any] = {
                "quota_utilisation": round(run["quota_utilisation"], 4),
                "throttled_ratio": round(run["throttled_ratio"], 4),
            }
            if case == "replicas3":
                rows.append(
                    (case, "shares of the calls", " | ".join(f"{share:.3f}" for share in run["shares"]))
                )
                figures["shares"] = run["shares"]
                figures["learned_tpm"] = [_learned(limits) for limits in run["rate_limits"]]
            else:
                rows.append(
                    (
                        case,
                        "wall s / window at the end",
                        f"{run['summary']['duration_s']:.1f} / {_window(run['rate_limits'])}",
                    )
                )
                figures["learned_tpm"] = _learned(run["rate_limits"])
                figures["window"] = _window(run["rate_limits"])
            self.result[case] = figures
        if (pool2 := phases.get("pool2")) is not None:
            served_by = pool2["served_by_deployment"]
            rows += [
                ("pool2", "prompts / charged tokens", f"{pool2['prompts']} / {pool2['charged_tokens']}"),
                ("pool2", "served TPM, both deployments (busy s)", f"{pool2['served_tpm']:.0f} ({pool2['busy_seconds']} s)"),
                ("pool2", f"pool_utilisation ÷ 2 × {POOL2_TPM:,} (≥ 0.85)", f"{pool2['quota_utilisation']:.3f}"),
                ("pool2", "throttled_ratio (≤ 0.05)", f"{pool2['throttled_ratio']:.4f} ({pool2['throttled']}/{pool2['requests']})"),
                ("pool2", "served by deployment", ", ".join(f"{k} {v}" for k, v in served_by.items())),
            ]  # fmt: skip
            self.result.update(
                {
                    "pool2_utilisation": round(pool2["quota_utilisation"], 4),
                    "pool2_throttled_ratio": round(pool2["throttled_ratio"], 4),
                    "pool2_both_used": all(count > 0 for count in served_by.values()),
                    "pool2_served_by_deployment": served_by,
                }
            )
        width = max(len(label) for _, label, _ in rows)
        print(f"{'phase':<9} {'measure':<{width}}  value")
        print(f"{'-' * 9} {'-' * width}  {'-' * 30}")
        for phase, label, value in rows:
            print(f"{phase:<9} {label:<{width}}  {value}")
        print(
            f"\nworker package: {worker_from}; concurrency {self.concurrency} (phases 1-3), the default "
            "(adaptive) in the others; 2 cores shared with the fake server"
        )
        print(f"total bench time: {total_s:.0f} s")
        self.result.update(
            {
                "cases": self.cases,
                "timing": "worker: run.summary duration_s (start-up excluded); bare: client open to last answer",
                "sink": "local folder",
                "busy_window": f"first served second +{RAMP_SECONDS} s (longlat +{LONGLAT_RAMP_SECONDS} s) "
                f"to last -{TAIL_SECONDS} s",
                "worker_package": worker_from,
            }
        )
        print(json.dumps(self.result))


def _learned(limits: dict[str, Any]) -> int | None:
    """The tokens-per-minute limit the worker learned for the bench's one deployment."""
    for budget in limits.values():
        learned = budget.get("tpm", {}).get("learned")
        return int(learned) if isinstance(learned, int | float) else None
    return None


def _window(limits: dict[str, Any]) -> int | None:
    """The in-flight window of the bench's one deployment at the end of the run."""
    for budget in limits.values():
        window = budget.get("window")
        return int(window) if isinstance(window, int) else None
    return None


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
