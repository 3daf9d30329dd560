"""One frozen Settings object, read once at start-up: command-line flags > environment > job file > defaults.

`OPTIONS` is the single table of how every setting is named (flag, environment variables, job-file key) and
what it does; `Settings` holds its type, default and bounds. The commands' options and their help, the
environment and job file readers, the error messages for missing settings and the README's configuration
table (checked by a test) all come from these two. `load_settings` is the only reader of the environment:
everything else, down to the credential and the TLS context, gets the `Settings` it returns.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticUndefined

from worker.errors import ConfigError
from worker.formats import parameters_problem
from worker.pool import DeploymentConfig, deployments_from_env, parse_deployments

AuthMode = Literal[
    "auto",
    "managed-identity",
    "service-principal",
    "workload-identity",
    "azure-cli",
    "interactive",
    "gcp-federation",
    "api-key",
]
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
LogFormat = Literal["auto", "json", "console"]
Backend = Literal["online", "batch"]
BatchFallback = Literal["none", "online"]
MAX_DRAIN_SECONDS = 18.0
"""SIGTERM gives 30 s: a drain of at most this, 4 s to write what finished, then leases and the manifest."""


@dataclass(frozen=True, kw_only=True)
class Option:
    """How one setting is named on each layer."""

    name: str
    flag: str | None
    env: tuple[str, ...]
    job_key: str | None
    help: str


OPTIONS: tuple[Option, ...] = (
    Option(
        name="source",
        flag="--source",
        env=("WORKER_SOURCE",),
        job_key="source",
        help="Folder of prompt files: a local directory or a blob URL (https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX).",
    ),
    Option(
        name="sink",
        flag="--sink",
        env=("WORKER_SINK",),
        job_key="sink",
        help="Folder for results: a local directory or a blob URL. Created when missing and permitted.",
    ),
    Option(
        name="deployment",
        flag="--deployment",
        env=("AZURE_OPENAI_DEPLOYMENT", "AZURE_OPENAI_CHAT_DEPLOYMENT"),
        job_key="deployment",
        help="Azure OpenAI deployment for requests whose body names no `model`.",
    ),
    Option(
        name="deployments",
        flag=None,
        env=("AZURE_OPENAI_DEPLOYMENTS",),
        job_key="deployments",
        help="A pool of deployments: in a job file `[[deployments]]` entries (name, endpoint, serves, priority, tpm, rpm; see README, Many deployments); in the environment `a,b,c`, deployments on AZURE_OPENAI_ENDPOINT in priority order, serving --deployment (else the first name).",
    ),
    Option(
        name="auth",
        flag="--auth",
        env=("WORKER_AUTH",),
        job_key="auth",
        help="How to authenticate: " + ", ".join(AUTH_MODES) + ".",
    ),
    Option(
        name="concurrency",
        flag="--concurrency",
        env=("WORKER_CONCURRENCY",),
        job_key="limits.concurrency",
        help="Azure OpenAI requests in flight at most: the ceiling of the adaptive window (paced rate × "
        "latency), which does the work.",
    ),
    Option(
        name="job_file",
        flag="--job",
        env=("WORKER_JOB_FILE",),
        job_key=None,
        help="TOML job file (see jobs/example.toml).",
    ),
    Option(
        name="request_timeout",
        flag="--request-timeout",
        env=("WORKER_REQUEST_TIMEOUT",),
        job_key="limits.request_timeout",
        help="Seconds one attempt may take before it is abandoned and retried.",
    ),
    Option(
        name="max_attempts",
        flag="--max-attempts",
        env=("WORKER_MAX_ATTEMPTS",),
        job_key="limits.max_attempts",
        help="Failed attempts per item (5xx, timeouts, while the deployment answers other calls) before the item is left `interrupted` for the next run; 429s and outages do not spend attempts.",
    ),
    Option(
        name="tpm",
        flag="--tpm",
        env=("WORKER_TPM",),
        job_key="limits.tpm",
        help="The deployment's tokens-per-minute quota, paced client-side; unset = learned from x-ratelimit-remaining-* headers, with AIMD on 429s.",
    ),
    Option(
        name="rpm",
        flag="--rpm",
        env=("WORKER_RPM",),
        job_key="limits.rpm",
        help="The deployment's requests-per-minute quota, paced client-side; unset = learned from the headers.",
    ),
    Option(
        name="drain_seconds",
        flag="--drain-seconds",
        env=("WORKER_DRAIN_SECONDS",),
        job_key="limits.drain_seconds",
        help=f"On SIGTERM/SIGINT, seconds to let in-flight calls finish before they are abandoned for a rerun (at most {MAX_DRAIN_SECONDS:g}, so that the final writes fit the platform's 30 s).",
    ),
    Option(
        name="outage_seconds",
        flag="--outage-seconds",
        env=("WORKER_OUTAGE_SECONDS",),
        job_key="limits.outage_seconds",
        help="How long a deployment may keep failing (5xx, timeouts, connection errors) before the run stops taking work and exits 1; until then items wait without spending attempts.",
    ),
    Option(
        name="lease_seconds",
        flag="--lease-seconds",
        env=("WORKER_LEASE_SECONDS",),
        job_key="limits.lease_seconds",
        help="Blob lease on a work unit (15-60 s, renewed while held): how soon another run takes over the files of a replica that died.",
    ),
    Option(
        name="price_input_per_million",
        flag=None,
        env=("WORKER_PRICE_INPUT_PER_MILLION",),
        job_key="pricing.input_per_million",
        help="Price of 1M prompt tokens, for the manifest's estimated cost (your currency).",
    ),
    Option(
        name="price_output_per_million",
        flag=None,
        env=("WORKER_PRICE_OUTPUT_PER_MILLION",),
        job_key="pricing.output_per_million",
        help="Price of 1M completion tokens, for the manifest's estimated cost.",
    ),
    Option(
        name="backend",
        flag="--backend",
        env=("WORKER_BACKEND",),
        job_key="backend",
        help="online (calls as they go, results in minutes) or batch (the Batch API: about half the price, its own enqueued-token quota, results within 24 h; each run submits what is new and collects what finished).",
    ),
    Option(
        name="wait",
        flag="--wait",
        env=("WORKER_WAIT",),
        job_key="limits.wait",
        help="With the batch backend: seconds to keep polling until the batches finish (0 = submit, collect what is finished and exit).",
    ),
    Option(
        name="batch_poll_seconds",
        flag="--batch-poll-seconds",
        env=("WORKER_BATCH_POLL_SECONDS",),
        job_key="limits.batch_poll_seconds",
        help="With --wait: seconds between two looks at the batches (Azure asks for 60 or more).",
    ),
    Option(
        name="batch_max_lines",
        flag="--batch-max-lines",
        env=("WORKER_BATCH_MAX_LINES",),
        job_key="limits.batch_max_lines",
        help="Requests per Batch input file at most (the service takes 100,000).",
    ),
    Option(
        name="batch_max_bytes",
        flag="--batch-max-bytes",
        env=("WORKER_BATCH_MAX_BYTES",),
        job_key="limits.batch_max_bytes",
        help="Bytes per Batch input file at most (the service takes 200 MB).",
    ),
    Option(
        name="batch_fallback",
        flag="--batch-fallback",
        env=("WORKER_BATCH_FALLBACK",),
        job_key="batch_fallback",
        help="What happens to Batch lines that expired or failed retryably: none (a new batch) or online (called online by this run).",
    ),
    Option(
        name="batch_discount",
        flag=None,
        env=("WORKER_BATCH_DISCOUNT",),
        job_key="pricing.batch_discount",
        help="Batch price as a fraction of the online price, for the manifest's estimated cost of each batch.",
    ),
    Option(
        name="endpoint",
        flag="--endpoint",
        env=("AZURE_OPENAI_ENDPOINT",),
        job_key="endpoint",
        help="Azure OpenAI endpoint, https://RESOURCE.openai.azure.com.",
    ),
    Option(
        name="api_version",
        flag="--api-version",
        env=("OPENAI_API_VERSION",),
        job_key="api_version",
        help="Azure OpenAI data-plane API version.",
    ),
    Option(
        name="api_key",
        flag=None,
        env=("AZURE_OPENAI_API_KEY",),
        job_key=None,
        help="Azure OpenAI key, used only with --auth api-key (never put it in a job file).",
    ),
    Option(
        name="storage_connection_string",
        flag=None,
        env=("AZURE_STORAGE_CONNECTION_STRING",),
        job_key=None,
        help="Storage connection string; when set, storage uses it instead of the Entra credential.",
    ),
    Option(
        name="system_prompt",
        flag=None,
        env=("WORKER_SYSTEM_PROMPT",),
        job_key="system_prompt",
        help="System message added to .txt/.md prompts.",
    ),
    Option(
        name="run_id",
        flag="--run-id",
        env=("WORKER_RUN_ID", "CONTAINER_APP_JOB_EXECUTION_NAME"),
        job_key=None,
        help="Name of this run's manifest; defaults to the Container Apps execution name or a timestamp.",
    ),
    Option(
        name="log_format",
        flag="--log-format",
        env=("WORKER_LOG_FORMAT",),
        job_key=None,
        help="json (one JSON object a line, for Log Analytics), console (progress bar), or auto (console in a TTY).",
    ),
    # The environment of the identity and the process: read here like every setting, set only there.
    Option(
        name="azure_client_id",
        flag=None,
        env=("AZURE_CLIENT_ID",),
        job_key=None,
        help="Client id of the identity: a user-assigned managed identity, or the app registration of --auth service-principal, workload-identity, gcp-federation or interactive.",
    ),
    Option(
        name="azure_tenant_id",
        flag=None,
        env=("AZURE_TENANT_ID",),
        job_key=None,
        help="Entra tenant of that app registration.",
    ),
    Option(
        name="azure_client_secret",
        flag=None,
        env=("AZURE_CLIENT_SECRET",),
        job_key=None,
        help="Client secret of the app registration, for --auth service-principal.",
    ),
    Option(
        name="azure_client_certificate_path",
        flag=None,
        env=("AZURE_CLIENT_CERTIFICATE_PATH",),
        job_key=None,
        help="Certificate (PEM or PKCS12, with its private key) of the app registration, for --auth service-principal without a secret.",
    ),
    Option(
        name="azure_client_certificate_password",
        flag=None,
        env=("AZURE_CLIENT_CERTIFICATE_PASSWORD",),
        job_key=None,
        help="Password of that certificate, if it has one.",
    ),
    Option(
        name="azure_federated_token_file",
        flag=None,
        env=("AZURE_FEDERATED_TOKEN_FILE",),
        job_key=None,
        help="Kubernetes service account token that --auth workload-identity exchanges (set by the AKS webhook).",
    ),
    Option(
        name="azure_authority_host",
        flag=None,
        env=("AZURE_AUTHORITY_HOST",),
        job_key=None,
        help="Entra authority other than login.microsoftonline.com (a sovereign cloud); --auth interactive then skips instance discovery.",
    ),
    Option(
        name="gce_metadata_host",
        flag=None,
        env=("GCE_METADATA_HOST",),
        job_key=None,
        help="Google metadata server that --auth gcp-federation asks for an ID token, instead of metadata.google.internal.",
    ),
    Option(
        name="ssl_cert_file",
        flag=None,
        env=("SSL_CERT_FILE",),
        job_key=None,
        help="CA certificates to trust instead of the system's (a private CA in front of storage or Azure OpenAI).",
    ),
    Option(
        name="azure_openai_ad_token",
        flag=None,
        env=("AZURE_OPENAI_AD_TOKEN",),
        job_key=None,
        help="A static token the OpenAI SDK would prefer; it would expire mid-run, so the worker ignores it and warns.",
    ),
    Option(
        name="applicationinsights_connection_string",
        flag=None,
        env=("APPLICATIONINSIGHTS_CONNECTION_STRING",),
        job_key=None,
        help="Send metrics to Application Insights (needs the `azure-monitor` extra: `pip install 'aoai-batch-worker[azure-monitor]'`, included in the image).",
    ),
    Option(
        name="otel_service_name",
        flag=None,
        env=("OTEL_SERVICE_NAME",),
        job_key=None,
        help="Service name of those metrics (Application Insights' cloud role name) instead of aoai-batch-worker.",
    ),
)
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}

DEFAULT_API_VERSION = "2024-10-21"


class Settings(BaseModel):
    """Everything the run needs, validated once. Secrets are SecretStr so they never print."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str | None = None
    sink: str | None = None
    deployment: str | None = None
    deployments: tuple[DeploymentConfig, ...] = ()
    auth: AuthMode = "auto"
    concurrency: int = Field(default=2048, ge=1, le=4096)
    request_timeout: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=100)
    tpm: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)
    drain_seconds: float = Field(default=15.0, ge=0)
    outage_seconds: float = Field(default=300.0, gt=0)
    lease_seconds: int = Field(default=30, ge=15, le=60)
    price_input_per_million: float | None = Field(default=None, ge=0)
    price_output_per_million: float | None = Field(default=None, ge=0)
    backend: Backend = "online"
    wait: float = Field(default=0.0, ge=0)
    batch_poll_seconds: float = Field(default=60.0, gt=0)
    batch_max_lines: int = Field(default=100_000, ge=1, le=100_000)
    batch_max_bytes: int = Field(default=200_000_000, ge=1024, le=200_000_000)
    batch_fallback: BatchFallback = "none"
    batch_discount: float = Field(default=0.5, ge=0, le=1)
    endpoint: str | None = None
    api_version: str = DEFAULT_API_VERSION
    api_key: SecretStr | None = None
    storage_connection_string: SecretStr | None = None
    system_prompt: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None
    log_format: LogFormat = "auto"
    job_file: str | None = None
    max_prompt_bytes: int = 8 * 1024 * 1024
    max_jsonl_bytes: int = 200 * 1024 * 1024
    azure_client_id: str | None = None
    azure_tenant_id: str | None = None
    azure_client_secret: SecretStr | None = None
    azure_client_certificate_path: str | None = None
    azure_client_certificate_password: SecretStr | None = None
    azure_federated_token_file: str | None = None
    azure_authority_host: str | None = None
    gce_metadata_host: str | None = None
    ssl_cert_file: str | None = None
    azure_openai_ad_token: SecretStr | None = None
    applicationinsights_connection_string: SecretStr | None = None
    otel_service_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _pool(cls, data: Any) -> Any:
        """AZURE_OPENAI_DEPLOYMENTS=a,b,c serves --deployment, else the first name; with a pool and no
        --deployment, requests that name no model target what the first deployment serves."""
        if not isinstance(data, dict):
            return data
        entries = data.get("deployments")
        if isinstance(entries, str):
            entries = deployments_from_env(entries, data.get("deployment") or None)
            data = {**data, "deployments": entries}
        if entries and not data.get("deployment") and isinstance(entries[0], DeploymentConfig):
            data = {**data, "deployment": entries[0].serves}
        return data

    @field_validator("drain_seconds")
    @classmethod
    def _drain_fits_the_stop_deadline(cls, value: float) -> float:
        return min(value, MAX_DRAIN_SECONDS)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be a URL such as https://RESOURCE.openai.azure.com")
        return value.rstrip("/") if value else value

    def require(self, *names: str) -> None:
        """Raise ConfigError naming every missing setting and how to set it."""
        missing = [name for name in names if getattr(self, name) in (None, "")]
        if missing:
            raise ConfigError("missing setting: " + "; ".join(describe(name) for name in missing))


def shown_default(name: str) -> str | None:
    """A setting's default as the help text and the README show it (`120`, not `120.0`); None if it has none."""
    default = Settings.model_fields[name].default
    if default is None or default is PydanticUndefined or default == ():
        return None
    return f"{default:g}" if isinstance(default, float) else str(default)


def describe(name: str) -> str:
    """`--sink / WORKER_SINK / job file key sink (help)` for messages."""
    option = OPTIONS_BY_NAME[name]
    ways = [w for w in (option.flag, *option.env) if w]
    if option.job_key:
        ways.append(f"job file key `{option.job_key}`")
    return f"{' or '.join(ways)} ({option.help})"


def load_job_file(path: Path) -> dict[str, Any]:
    """Read a TOML job file into flat setting names. Unknown keys are an error (typos must not pass)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"job file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"job file {path} is not valid TOML: {exc}") from None

    by_key = {option.job_key: option.name for option in OPTIONS if option.job_key}
    values: dict[str, Any] = {}
    for section, content in document.items():
        if section == "deployments":
            values["deployments"] = parse_deployments(content, f"job file {path}")
        elif section == "parameters":
            if not isinstance(content, dict):
                raise ConfigError(f"job file {path}: [parameters] must be a table of request parameters")
            problem = parameters_problem(content)
            if problem is not None:
                raise ConfigError(f"job file {path}: {problem}")
            values["parameters"] = content
        elif isinstance(content, dict) and section in ("job", "limits", "pricing"):
            for key, value in content.items():
                dotted = key if section == "job" else f"{section}.{key}"
                if dotted not in by_key:
                    raise ConfigError(f"job file {path}: unknown key `{key}` in [{section}]")
                values[by_key[dotted]] = value
        elif section in by_key:
            values[by_key[section]] = content
        else:
            raise ConfigError(f"job file {path}: unknown key `{section}`")
    return values


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment sets; empty variables count as unset."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        for variable in option.env:
            if environ.get(variable):
                values[option.name] = environ[variable]
                break
    return values


def load_settings(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, job_file: str | None = None
) -> Settings:
    """Merge flags > environment > job file > defaults into one validated Settings.

    `environ` (default: the process environment) is read here and nowhere else; `job_file` is the --job
    flag, which comes before WORKER_JOB_FILE.
    """
    from_env = from_environment(os.environ if environ is None else environ)
    job_file_variable = from_env.pop("job_file", None)
    job_file = job_file or job_file_variable
    merged: dict[str, Any] = {}
    if job_file:
        merged.update(load_job_file(Path(job_file)))
        merged["job_file"] = job_file
    merged.update(from_env)
    merged.update({name: value for name, value in flags.items() if value is not None})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            where = describe(name) if name in OPTIONS_BY_NAME else name
            problems.append(f"{where}: {error['msg']}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None


def check_pool(settings: Settings) -> None:
    """What a pool needs besides its entries: AZURE_OPENAI_ENDPOINT unless every deployment names its
    endpoint; with --auth api-key, the one endpoint the key belongs to."""
    pool = settings.deployments
    if pool and settings.backend == "batch":
        raise ConfigError(
            "--backend batch sends each Batch file to one deployment at AZURE_OPENAI_ENDPOINT; a pool of "
            "[[deployments]] (or AZURE_OPENAI_DEPLOYMENTS) is for the online backend: remove it, or use "
            "--backend online"
        )
    if not pool or any(entry.endpoint is None for entry in pool):
        settings.require("endpoint")
    if settings.auth == "api-key" and any(entry.endpoint not in (None, settings.endpoint) for entry in pool):
        raise ConfigError(
            "--auth api-key has one key (AZURE_OPENAI_API_KEY) for AZURE_OPENAI_ENDPOINT, but the pool has "
            "deployments at other endpoints: use Entra ID (--auth auto, managed-identity, ...), whose one "
            "credential serves every endpoint"
        )
