from pathlib import Path

import pytest
from pydantic import SecretStr

from worker.errors import ConfigError
from worker.settings import OPTIONS, OPTIONS_BY_NAME, Settings, load_settings


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


def test_every_secret_setting_is_a_secret_str() -> None:
    secrets = {
        name
        for name, field in Settings.model_fields.items()
        if field.annotation is not None and SecretStr in getattr(field.annotation, "__args__", ())
    }
    assert secrets == {
        "api_key",
        "storage_connection_string",
        "azure_client_secret",
        "azure_client_certificate_password",
        "azure_openai_ad_token",
        "applicationinsights_connection_string",
    }
    environ = {
        variable: f"secret-{name}-7f3a" for name in secrets for variable in (OPTIONS_BY_NAME[name].env[0],)
    }
    settings = load_settings({}, environ)
    assert "7f3a" not in repr(settings) + str(settings) + settings.model_dump_json()
    assert all(getattr(settings, name).get_secret_value() == f"secret-{name}-7f3a" for name in secrets)


def test_the_identity_and_process_environment_is_read_with_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        {},
        {
            "AZURE_CLIENT_ID": "app-id",
            "AZURE_TENANT_ID": "tenant-id",
            "AZURE_FEDERATED_TOKEN_FILE": "/var/run/token",
            "GCE_METADATA_HOST": "127.0.0.1:8080",
            "SSL_CERT_FILE": "/etc/ca.pem",
            "OTEL_SERVICE_NAME": "batch",
            "AZURE_OPENAI_AD_TOKEN": "",
        },
    )
    assert (settings.azure_client_id, settings.azure_tenant_id) == ("app-id", "tenant-id")
    assert settings.azure_federated_token_file == "/var/run/token"
    assert settings.gce_metadata_host == "127.0.0.1:8080"
    assert (settings.ssl_cert_file, settings.otel_service_name) == ("/etc/ca.pem", "batch")
    assert settings.azure_openai_ad_token is None  # empty is unset
    job = tmp_path / "job.toml"
    job.write_text('azure_client_id = "app-id"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key `azure_client_id`"):
        load_settings({}, {}, job_file=str(job))


def test_the_job_flag_beats_the_job_file_variable(tmp_path: Path) -> None:
    flagged, variable = tmp_path / "flag.toml", tmp_path / "variable.toml"
    flagged.write_text('source = "from-flag"\n', encoding="utf-8")
    variable.write_text('source = "from-variable"\n', encoding="utf-8")
    settings = load_settings({}, {"WORKER_JOB_FILE": str(variable)}, job_file=str(flagged))
    assert (settings.source, settings.job_file) == ("from-flag", str(flagged))
    settings = load_settings({}, {"WORKER_JOB_FILE": str(variable)})
    assert (settings.source, settings.job_file) == ("from-variable", str(variable))


def test_shipped_example_job_file_loads() -> None:
    example = Path(__file__).parents[2] / "jobs" / "example.toml"
    settings = load_settings({}, {}, job_file=str(example))
    assert settings.source and settings.sink and settings.deployment


def test_every_option_has_an_environment_variable() -> None:
    assert all(option.env for option in OPTIONS)


def test_every_option_is_a_settings_field() -> None:
    assert {option.name for option in OPTIONS} <= set(Settings.model_fields)


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
