"""Many deployments, one job (issue 12): a pool in a job file, through the real CLI on the local stack.

The fake Azure OpenAI serves every deployment of the pool; per-deployment quotas, outages and forced 429s
hit one deployment only. A second "region" is the same fake reached as https://localhost:<port> (the
stack's certificate covers both names): the fake counts requests by host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.helpers import manifest, new_container, results, run_worker, upload
from tests.e2e.test_doctor import doctor
from tests.e2e.test_outcomes import blob_args, events_named
from tests.e2e.test_resilience import assert_exactly_once, batch_files
from tests.stack import LocalStack

ALIAS = "pool"
NO_DEPLOYMENT = {"AZURE_OPENAI_DEPLOYMENT": ""}
"""The stack's environment names a deployment; the job file's `deployment` (the alias) comes after it."""


def pool_job(tmp_path: Path, *entries: dict[str, Any], deployment: str = ALIAS) -> str:
    """A job file with `deployment` and one [[deployments]] table per entry."""
    lines = [f"deployment = {json.dumps(deployment)}"]
    for entry in entries:
        lines.append("[[deployments]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path = tmp_path / "pool.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def served(stack: LocalStack, deployment: str, status: int = 200) -> int:
    return int(stack.openai.stats()["by_deployment_status"].get(f"{deployment} {status}", 0))


def first(stack: LocalStack, deployment: str, status: int) -> int:
    return int(stack.openai.stats()["first_by_deployment_status"][f"{deployment} {status}"])


def upload_items(stack: LocalStack, tag: str, files: int, lines: int) -> tuple[str, str, set[str]]:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    data, ids = batch_files(files, lines, tag)
    upload(stack, source, data)
    return source, sink, ids


def test_two_deployments_of_equal_priority_share_the_load_each_within_its_own_quota(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "share", 2, 60)
    stack.openai.configure(
        deployments=["east", "west"],
        latency_ms=20,
        deployment_limits={"east": {"rpm": 600}, "west": {"rpm": 600}},
    )
    job = pool_job(
        tmp_path,
        {"name": "east", "serves": ALIAS, "rpm": 600},
        {"name": "west", "serves": ALIAS, "rpm": 600},
    )

    run = run_worker(
        stack,
        *blob_args(stack, source, sink, "--concurrency", "8", "--job", job, "--run-id", "share"),
        env=NO_DEPLOYMENT,
    )

    assert run.code == 0, run.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)
    east, west = served(stack, "east"), served(stack, "west")
    assert east + west == len(ids)
    assert min(east, west) >= len(ids) // 4, (east, west)
    assert stack.openai.stats()["throttled"] == 0  # each deployment paced at its own quota
    per_deployment = run.summary["deployments"]
    assert per_deployment["east"]["calls"] == east
    assert per_deployment["west"]["calls"] == west
    assert per_deployment["east"]["rpm"] == 600
    assert per_deployment["east"]["prompt_tokens"] > 0
    written = manifest(stack, sink, "", "share")
    assert written["deployments"]["west"]["serves"] == ALIAS
    assert written["deployments"]["west"]["succeeded"] == west


def test_the_priority_0_deployment_is_saturated_before_anything_spills(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "spill", 1, 60)
    # ptu admits 10 requests per 10 s window; no x-ratelimit-* headers (as behind a gateway), so the
    # worker learns ptu's quota only from its first 429.
    stack.openai.configure(
        deployments=["ptu", "paygo"], rate_headers=False, deployment_limits={"ptu": {"rpm": 60}}
    )
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack, *blob_args(stack, source, sink, "--concurrency", "4", "--job", job), env=NO_DEPLOYMENT
    )

    assert run.code == 0, run.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)
    ptu, paygo = served(stack, "ptu"), served(stack, "paygo")
    assert ptu >= 10  # its whole window
    assert paygo > 0 and ptu + paygo == len(ids)
    assert first(stack, "ptu", 429) < first(stack, "paygo", 200)  # nothing spilled before ptu was full
    assert served(stack, "ptu", 429) <= 4  # the ones in flight when it filled; then the rest went on at once
    assert run.summary["deployments"]["ptu"]["throttled"] == served(stack, "ptu", 429)


def test_a_429_sends_the_item_to_the_next_deployment_instead_of_waiting(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "throttle", 1, 10)
    # ptu answers every request 429 asking for 250 s: waiting for it would outlast the run's timeout.
    stack.openai.configure(
        deployments=["ptu", "paygo"], throttle_deployments=["ptu"], force_429_retry_after_ms=250_000
    )
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack,
        *blob_args(stack, source, sink, "--concurrency", "2", "--job", job),
        env=NO_DEPLOYMENT,
        timeout=120,
    )

    assert run.code == 0, run.stdout[-3000:]
    records = results(stack, sink)
    assert_exactly_once(records, ids)
    assert {record["response"]["body"]["model"] for record in records} == {"paygo"}
    assert served(stack, "paygo") == len(ids)
    assert 1 <= served(stack, "ptu", 429) <= 2  # the first attempts; then ptu's budget is paused
    assert run.summary["deployments"]["ptu"]["throttled"] >= 1


def test_a_deployment_that_answers_503_throughout_is_left_out_and_the_pool_carries_on(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "outage", 2, 50)
    stack.openai.configure(deployments=["ptu", "paygo"], outage_deployments=["ptu"], latency_ms=10)
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack, *blob_args(stack, source, sink, "--concurrency", "8", "--job", job), env=NO_DEPLOYMENT
    )

    assert run.code == 0, run.stdout[-3000:]
    records = results(stack, sink)
    assert_exactly_once(records, ids)
    assert [record for record in records if record["error"] is not None] == []
    assert served(stack, "paygo") == len(ids)
    assert served(stack, "ptu", 503) >= 5  # enough to open its circuit
    assert served(stack, "ptu", 503) < len(ids) // 2  # then only probes
    assert [event["deployment"] for event in events_named(run, "deployment.unavailable")] == ["ptu"]
    assert run.summary["deployments"]["ptu"]["calls"] == served(stack, "ptu", 503)
    assert run.summary["deployments"]["ptu"]["prompt_tokens"] == 0


def test_a_pool_whose_every_deployment_is_down_exits_1_recording_nothing(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "alldown", 1, 10)
    stack.openai.configure(deployments=["ptu", "paygo"], outage_deployments=["ptu", "paygo"])
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack,
        *blob_args(stack, source, sink, "--concurrency", "4", "--outage-seconds", "3", "--job", job),
        env=NO_DEPLOYMENT,
    )

    assert run.code == 1, run.stdout[-3000:]
    assert results(stack, sink) == []
    assert run.summary["failed"] == 0
    assert run.summary["interrupted"] >= 1
    assert sorted(event["deployment"] for event in events_named(run, "deployment.down")) == ["paygo", "ptu"]
    assert {name for name, report in run.summary["deployments"].items() if report.get("down")} == {
        "ptu",
        "paygo",
    }

    stack.openai.configure(outage_deployments=[])
    rerun = run_worker(stack, *blob_args(stack, source, sink, "--job", job), env=NO_DEPLOYMENT)
    assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)


def test_a_deployment_whose_daily_quota_is_used_up_drops_out_and_the_pool_carries_on(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink, ids = upload_items(stack, "daily", 1, 20)
    stack.openai.configure(
        deployments=["ptu", "paygo"], throttle_deployments=["ptu"], force_429_retry_after_ms=86_400_000
    )
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack, *blob_args(stack, source, sink, "--concurrency", "2", "--job", job), env=NO_DEPLOYMENT
    )

    assert run.code == 0, run.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)
    (down,) = events_named(run, "deployment.down")
    assert down["deployment"] == "ptu" and "quota" in down["reason"]
    assert served(stack, "ptu", 429) <= 2
    assert served(stack, "paygo") == len(ids)


def test_two_endpoints_one_credential(stack: LocalStack, tmp_path: Path) -> None:
    source, sink, ids = upload_items(stack, "regions", 2, 40)
    port = stack.openai_endpoint.rsplit(":", 1)[1]
    stack.openai.configure(deployments=["swc-ptu", "eus-paygo"], latency_ms=20)
    job = pool_job(
        tmp_path,
        {"name": "swc-ptu", "serves": ALIAS},  # at AZURE_OPENAI_ENDPOINT, https://127.0.0.1:<port>
        {"name": "eus-paygo", "serves": ALIAS, "endpoint": f"https://localhost:{port}"},
    )

    run = run_worker(
        stack,
        *blob_args(stack, source, sink, "--concurrency", "8", "--job", job, "--run-id", "regions"),
        env=NO_DEPLOYMENT,
    )

    assert run.code == 0, run.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)
    by_host = stack.openai.stats()["by_host"]
    assert by_host.get("127.0.0.1", 0) > 0 and by_host.get("localhost", 0) > 0, by_host
    assert by_host["localhost"] == served(stack, "eus-paygo")
    written = manifest(stack, sink, "", "regions")
    assert written["deployments"]["eus-paygo"]["endpoint"] == f"https://localhost:{port}"
    assert written["deployments"]["swc-ptu"]["endpoint"] is None
    issued = stack.identity.stats()["issued"]
    assert sum(1 for entry in issued if "cognitiveservices" in str(entry.get("audience"))) == 1


def test_a_body_naming_one_deployment_of_the_pool_reaches_just_that_one(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    lines = [
        json.dumps({"custom_id": f"n{i}", "method": "POST", "url": "/chat/completions",
                    "body": {"model": "paygo", "messages": [{"role": "user", "content": f"named {i}"}]}})
        for i in range(8)
    ]  # fmt: skip
    upload(stack, source, {"named.jsonl": "\n".join(lines).encode()})
    stack.openai.configure(deployments=["ptu", "paygo"])
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(stack, *blob_args(stack, source, sink, "--job", job), env=NO_DEPLOYMENT)

    assert run.code == 0, run.stdout[-3000:]
    assert served(stack, "paygo") == 8
    assert served(stack, "ptu") == 0


def test_doctor_checks_every_deployment_of_the_pool(stack: LocalStack, tmp_path: Path) -> None:
    port = stack.openai_endpoint.rsplit(":", 1)[1]
    stack.openai.configure(deployments=["ptu", "paygo"])
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS},
        {"name": "paygo", "serves": ALIAS, "priority": 1, "endpoint": f"https://localhost:{port}"},
        {"name": "payg-typo", "serves": ALIAS, "priority": 2},
    )

    done = doctor(stack, "--job", job, "--json", env=NO_DEPLOYMENT)

    assert done.returncode == 2, done.stdout
    checks = {check["check"]: check for check in json.loads(done.stdout)["checks"]}
    assert checks["deployment ptu"]["ok"] and "HTTP 200" in checks["deployment ptu"]["detail"]
    assert checks["deployment paygo"]["ok"]
    assert not checks["deployment payg-typo"]["ok"]
    assert "DeploymentNotFound" in checks["deployment payg-typo"]["detail"]
    assert "[[deployments]] entry's name" in checks["deployment payg-typo"]["fix"]
    assert checks["dns localhost"]["ok"]
    assert "paygo (priority 1, serves pool, at https://localhost:" in checks["setting deployments"]["detail"]


def test_a_deployment_setting_outside_the_pool_is_warned_about(stack: LocalStack, tmp_path: Path) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"p{i}.txt": f"prompt {i}".encode() for i in range(4)})
    stack.openai.configure(deployments=["ptu", "paygo"])
    job = pool_job(
        tmp_path,
        {"name": "ptu", "serves": ALIAS, "priority": 0},
        {"name": "paygo", "serves": ALIAS, "priority": 1},
    )

    run = run_worker(
        stack, *blob_args(stack, source, sink, "--job", job), env={"AZURE_OPENAI_DEPLOYMENT": "paygo"}
    )

    assert run.code == 0, run.stdout[-3000:]
    (warning,) = events_named(run, "config.deployment_outside_pool")
    assert warning["deployment"] == "paygo" and warning["aliases"] == [ALIAS]
    assert served(stack, "paygo") == 4  # its own name reaches just that deployment
