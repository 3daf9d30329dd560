"""The pool's configuration: `[[deployments]]` in a job file and AZURE_OPENAI_DEPLOYMENTS, strictly checked."""

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.pool import DeploymentConfig, endpoint_problem, labels
from worker.settings import check_pool, load_settings

POOL = """
deployment = "pool"
[[deployments]]
name = "gpt-4o-mini-ptu"
endpoint = "https://aoai-swc.openai.azure.com/"
serves = "pool"
priority = 0
tpm = 150000
rpm = 900
[[deployments]]
name = "gpt-4o-mini"
serves = "pool"
priority = 1
"""


def job(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_job_file_pool(tmp_path: Path) -> None:
    settings = load_settings({}, {}, job_file=job(tmp_path, POOL))
    assert settings.deployment == "pool"
    assert settings.deployments == (
        DeploymentConfig(
            name="gpt-4o-mini-ptu",
            endpoint="https://aoai-swc.openai.azure.com",
            serves="pool",
            priority=0,
            tpm=150000,
            rpm=900,
        ),
        DeploymentConfig(name="gpt-4o-mini", serves="pool", priority=1),
    )


def test_defaults_serves_its_own_name_and_the_first_alias_is_the_default_target(tmp_path: Path) -> None:
    settings = load_settings(
        {}, {}, job_file=job(tmp_path, '[[deployments]]\nname = "a"\n[[deployments]]\nname = "b"\n')
    )
    assert [(d.name, d.serves, d.priority, d.endpoint) for d in settings.deployments] == [
        ("a", "a", 0, None),
        ("b", "b", 0, None),
    ]
    assert settings.deployment == "a"


def test_the_environment_shorthand_serves_the_deployment_setting_else_the_first_name() -> None:
    settings = load_settings(
        {}, {"AZURE_OPENAI_DEPLOYMENTS": "ptu, paygo,spare", "AZURE_OPENAI_DEPLOYMENT": "chat"}
    )
    assert [(d.name, d.serves, d.priority) for d in settings.deployments] == [
        ("ptu", "chat", 0),
        ("paygo", "chat", 1),
        ("spare", "chat", 2),
    ]
    assert settings.deployment == "chat"
    settings = load_settings({}, {"AZURE_OPENAI_DEPLOYMENTS": "ptu,paygo"})
    assert {d.serves for d in settings.deployments} == {"ptu"}
    assert settings.deployment == "ptu"
    flagged = load_settings({"deployment": "flagged"}, {"AZURE_OPENAI_DEPLOYMENTS": "ptu,paygo"})
    assert {d.serves for d in flagged.deployments} == {"flagged"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ('name = "a"\nprio = 1', r"entry 1 \('a'\): unknown key `prio` \(known: name, endpoint, serves"),
        (
            'name = "a"\n[[deployments]]\nname = "a"',
            r"deployment 'a' at AZURE_OPENAI_ENDPOINT is listed twice",
        ),
        ('endpoint = "https://x.openai.azure.com"', r"entry 1: `name` must be"),
        ('name = "a"\nendpoint = "http://x.openai.azure.com"', r"must start with https://.*set it to"),
        ('name = "a"\nendpoint = "https://api.openai.com"', r"OpenAI's own API, not Azure OpenAI"),
        ('name = "a"\nendpoint = "https://example.com"', r"'example.com', not an Azure OpenAI resource"),
        ('name = "a"\nendpoint = "https://x.openai.azure.com/openai/v1"', r"must have no path"),
        ('name = "a"\npriority = -1', r"`priority` must be a whole number >= 0"),
        ('name = "a"\ntpm = "lots"', r"`tpm` must be a whole number >= 1"),
        ('name = "a"\nserves = ""', r"`serves` must be"),
    ],
)
def test_bad_entries_name_the_entry_and_the_fix(tmp_path: Path, entries: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, {}, job_file=job(tmp_path, f"[[deployments]]\n{entries}\n"))


def test_deployments_must_be_an_array_of_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"array of tables"):
        load_settings({}, {}, job_file=job(tmp_path, 'deployments = "a,b"\n'))


def test_a_bad_environment_shorthand() -> None:
    with pytest.raises(ConfigError, match=r"AZURE_OPENAI_DEPLOYMENTS='a,,b'.*separated by commas"):
        load_settings({}, {"AZURE_OPENAI_DEPLOYMENTS": "a,,b"})
    with pytest.raises(ConfigError, match=r"'a' at AZURE_OPENAI_ENDPOINT is listed twice"):
        load_settings({}, {"AZURE_OPENAI_DEPLOYMENTS": "a,a"})


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://aoai-swc.openai.azure.com",
        "https://my-ai.cognitiveservices.azure.com/",
        "https://hub.services.ai.azure.com",
        "https://gov.openai.azure.us",
        "https://127.0.0.1:8443",
        "https://localhost:8443",
    ],
)
def test_azure_openai_endpoints_are_accepted(endpoint: str) -> None:
    assert endpoint_problem(endpoint) is None


def test_the_same_name_at_two_endpoints_gets_labels_with_the_host() -> None:
    entries = [
        DeploymentConfig(name="gpt-4o-mini", endpoint="https://swc.openai.azure.com"),
        DeploymentConfig(name="gpt-4o-mini", endpoint="https://eus.openai.azure.com"),
        DeploymentConfig(name="other"),
    ]
    assert labels(entries) == [
        "gpt-4o-mini@swc.openai.azure.com",
        "gpt-4o-mini@eus.openai.azure.com",
        "other",
    ]


def test_the_default_endpoint_is_needed_only_when_some_deployment_has_none(tmp_path: Path) -> None:
    everywhere = '[[deployments]]\nname = "a"\nendpoint = "https://a.openai.azure.com"\n'
    check_pool(load_settings({}, {}, job_file=job(tmp_path, everywhere)))
    with pytest.raises(ConfigError, match="AZURE_OPENAI_ENDPOINT"):
        check_pool(load_settings({}, {}, job_file=job(tmp_path, '[[deployments]]\nname = "a"\n')))


def test_api_key_mode_cannot_reach_other_endpoints(tmp_path: Path) -> None:
    path = job(tmp_path, '[[deployments]]\nname = "a"\nendpoint = "https://a.openai.azure.com"\n')
    settings = load_settings(
        {}, {"WORKER_AUTH": "api-key", "AZURE_OPENAI_ENDPOINT": "https://b.openai.azure.com"}, job_file=path
    )
    with pytest.raises(ConfigError, match="use Entra ID"):
        check_pool(settings)


def test_a_pool_is_refused_with_the_batch_backend(tmp_path: Path) -> None:
    settings = load_settings({"backend": "batch"}, {}, job_file=job(tmp_path, POOL))
    with pytest.raises(ConfigError, match="--backend online"):
        check_pool(settings)


def test_the_console_summary_has_a_line_per_deployment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    from worker.cli import _print_summary
    from worker.report import RunResult, RunStats

    report = {"calls": 120, "throttled": 3, "prompt_tokens": 51200, "completion_tokens": 9800, "tpm": 30000}
    result = RunResult(
        run_id="r",
        exit_code=0,
        stats=RunStats(),
        deployments={
            "ptu": {**report, "rpm": None, "down": None},
            "paygo": {**report, "rpm": 180, "down": "x"},
        },
    )
    _print_summary(result, json_lines=False)
    out = capsys.readouterr().out
    assert "120 calls, 3 × 429, 51,200 + 9,800 tokens, tpm 30000, rpm —" in out
    assert "rpm 180, down" in out


def test_the_shipped_pool_job_loads() -> None:
    settings = load_settings({}, {}, job_file=str(Path(__file__).parents[2] / "jobs" / "pool.toml"))
    assert settings.deployment == "chat"
    assert [(d.name, d.priority) for d in settings.deployments] == [
        ("gpt-4o-mini-ptu", 0),
        ("gpt-4o-mini", 1),
    ]
    check_pool(settings)
