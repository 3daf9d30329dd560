from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import OPTIONS, load_settings


def test_flags_beat_environment_beat_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'source = "from-job"\nsink = "sink-job"\ndeployment = "dep-job"\n'
        "[limits]\nconcurrency = 3\nmax_attempts = 2\n[parameters]\ntemperature = 0.5\n",
        encoding="utf-8",
    )
    settings = load_settings(
        {"source": "from-flag", "concurrency": None},
        {"WORKER_SOURCE": "from-env", "WORKER_SINK": "sink-env", "WORKER_CONCURRENCY": "9"},
        job_file=str(job),
    )
    assert settings.source == "from-flag"
    assert settings.sink == "sink-env"
    assert settings.deployment == "dep-job"
    assert settings.concurrency == 9
    assert settings.max_attempts == 2
    assert settings.parameters == {"temperature": 0.5}


def test_deployment_alias_and_empty_variables() -> None:
    settings = load_settings({}, {"AZURE_OPENAI_DEPLOYMENT": "", "AZURE_OPENAI_CHAT_DEPLOYMENT": "chat"})
    assert settings.deployment == "chat"


def test_missing_setting_names_flag_and_variable() -> None:
    settings = load_settings({}, {})
    with pytest.raises(ConfigError, match=r"--sink or WORKER_SINK"):
        settings.require("source", "sink")


def test_invalid_values_say_which_setting() -> None:
    with pytest.raises(ConfigError, match=r"--concurrency or WORKER_CONCURRENCY.*greater than or equal to 1"):
        load_settings({}, {"WORKER_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match="--auth"):
        load_settings({"auth": "password"}, {})


def test_job_file_typos_are_errors(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text("[limits]\nconcurency = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key `concurency`"):
        load_settings({}, {}, job_file=str(job))


def test_secrets_never_print(tmp_path: Path) -> None:
    settings = load_settings(
        {}, {"AZURE_OPENAI_API_KEY": "k" * 32, "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=zzz"}
    )
    assert "k" * 32 not in repr(settings)
    assert "zzz" not in str(settings)


def test_shipped_example_job_file_loads() -> None:
    example = Path(__file__).parents[2] / "jobs" / "example.toml"
    settings = load_settings({}, {}, job_file=str(example))
    assert settings.source and settings.sink and settings.deployment


def test_every_option_has_an_environment_variable() -> None:
    assert all(option.env for option in OPTIONS)


@pytest.mark.parametrize(
    ("parameters", "problem"),
    [
        ("stream = true", r"parameters\.stream is true, but the worker collects whole answers"),
        ("max_tokens = nan", r"parameters\.max_tokens must be a whole number from 1 to 1000000, not nan"),
        ("temperature = inf", r"parameters\.temperature must be a number from 0 to 2, not inf"),
        ('model = ".."', r"parameters\.model must be a deployment name"),
        ("logit_bias = { 50256 = -inf }", r"parameters\.logit_bias\.50256 must be a finite number, not -inf"),
    ],
)
def test_job_parameters_no_request_could_send_are_a_configuration_error(
    tmp_path: Path, parameters: str, problem: str
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f"[parameters]\n{parameters}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"job file .*job\.toml: {problem}"):
        load_settings({}, {}, job_file=str(job))
