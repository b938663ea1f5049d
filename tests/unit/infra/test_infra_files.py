"""The deployment files in ``infra/`` held to the code they run.

Docker and Kubernetes cannot run where these tests run, so the files are checked against everything that can
be checked without them: they parse; every ``LORAFLEET_*`` name is a real setting and every container's
environment passes ``load_settings``; every command they run parses with the real parser (the ``lorafleet``
CLI, the scheduler's, Ray's ``ray start``); the entry points start; the Serve config builds its app; compose
orders the migration first; and the facts that several files must agree on (image, Ray version, names of
KubeRay's Services, ports) do agree. Nothing is executed beyond ``--help``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.config import Settings, load_settings
from lorafleet.entrypoints.cli import build_parser

REPO = Path(__file__).resolve().parents[3]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
IMAGE = "lorafleet"  # the image name the manifests use (kustomization.yaml maps it to a registry)
SETTINGS_VARS = {f"LORAFLEET_{name.upper()}" for name in Settings.model_fields}
#: variables read by the code directly, not through Settings: name -> the file that reads it (none: every
#: ``LORAFLEET_*`` variable is a Settings field, ``LORAFLEET_MIGRATIONS_DIR`` included)
EXTRA_VARS: dict[str, Path] = {}
EXPECTED_K8S = {
    "namespace.yaml": [("v1", "Namespace")],
    "configmap.yaml": [("v1", "ConfigMap")],
    "secret.yaml": [("v1", "Secret"), ("v1", "Secret")],
    "migrate-job.yaml": [("batch/v1", "Job")],
    "raycluster.yaml": [("ray.io/v1", "RayCluster")],
    "rayservice.yaml": [("ray.io/v1", "RayService")],
    "api.yaml": [("apps/v1", "Deployment"), ("v1", "Service")],
    "scheduler.yaml": [("apps/v1", "Deployment")],
    "trainers.yaml": [("apps/v1", "Deployment")],
    "kustomization.yaml": [("kustomize.config.k8s.io/v1beta1", "Kustomization")],
}
Env = dict[str, str]
Argv = list[str]


# --- reading the files ------------------------------------------------------------------------------------
def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    return [
        doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path) if doc["kind"] != "Kustomization"
    ]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template, the Ray head and worker groups included."""
    for obj in k8s_objects():
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "Job"):
            yield where, spec["template"]["spec"]
        cluster = spec.get("rayClusterConfig", spec) if obj["kind"].startswith("Ray") else {}
        if "headGroupSpec" in cluster:
            yield f"{where} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{where} {group['groupName']}", group["template"]["spec"]


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in pod_specs():
        for container in spec["containers"]:
            yield f"{where} {container['name']}", container


def ray_groups() -> Iterator[tuple[str, bool, dict[str, Any]]]:
    """(where, is head, group spec) of both Ray clusters."""
    for kind in ("RayCluster", "RayService"):
        obj = k8s_object(kind)
        cluster = obj["spec"].get("rayClusterConfig", obj["spec"])
        yield f"{kind} head", True, cluster["headGroupSpec"]
        for group in cluster["workerGroupSpecs"]:
            yield f"{kind} {group['groupName']}", False, group


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def docker_values(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def docker_exec_form(keyword: str) -> Argv:
    (value,) = docker_values(keyword)[-1:]
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"{keyword} must be in exec (JSON) form"
    return [str(v) for v in parsed]


def docker_key_values(keyword: str) -> Env:
    """``ARG NAME=value`` / ``ENV A=1 B=2`` pairs (without a value: empty)."""
    pairs: Env = {}
    for rest in docker_values(keyword):
        for token in shlex.split(rest):
            name, has_value, value = token.partition("=")
            if has_value or name not in pairs:  # a later bare `ARG NAME` only re-declares it in a stage
                pairs[name] = value
    return pairs


def env_file() -> Env:
    pairs = (line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines())
    return {k.strip(): v.strip() for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, variables: Env) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}`` and ``$$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1), match.group(2), match.group(3)
        value = variables.get(name)
        # with a colon, an empty value counts as unset too
        unset = not value if op and op.startswith(":") else value is None
        if op is None or not unset:
            return value or ""
        assert "?" not in op, f"${{{name}}} is required and not in infra/.env.example"
        return default

    return _INTERPOLATION.sub(replace, value)


def compose() -> dict[str, Any]:
    data = load_all(INFRA / "compose.yaml")[0]
    assert isinstance(data, dict)
    return data


def project_services() -> dict[str, dict[str, Any]]:
    """The compose services that run the lorafleet image (built from infra/Dockerfile)."""
    return {
        n: s
        for n, s in compose()["services"].items()
        if s.get("build", {}).get("dockerfile") == "infra/Dockerfile"
    }


def compose_env(service: dict[str, Any]) -> Env:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v), env_file()) for k, v in env.items()}


def container_env(container: dict[str, Any]) -> Env:
    """What a container's ``envFrom`` and ``env`` give it (each reference must exist)."""
    env: Env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(k8s_object("Secret", source["secretRef"]["name"])["stringData"])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    return env


# --- the commands the files run ---------------------------------------------------------------------------
def runs() -> list[tuple[str, Argv]]:
    """(where, argv) of every lorafleet-image process the Dockerfile, compose and the manifests start."""
    entrypoint, cmd = docker_exec_form("ENTRYPOINT"), docker_exec_form("CMD")
    found: list[tuple[str, Argv]] = [("Dockerfile", entrypoint + cmd)]
    variables = env_file()
    for name, service in project_services().items():
        # compose: an entrypoint of the service drops the image's CMD too
        head = service.get("entrypoint", entrypoint)
        tail = service["command"] if "command" in service else (cmd if "entrypoint" not in service else [])
        found.append((f"compose {name}", [interpolate(str(a), variables) for a in [*head, *tail]]))
    for where, container in containers():
        if container.get("image") != IMAGE or where.startswith("Ray"):
            continue  # KubeRay writes the Ray containers' command (checked in test_ray_start_parameters)
        # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD unless `args` is given)
        head = container.get("command", entrypoint)
        tail = container["args"] if "args" in container else (cmd if "command" not in container else [])
        found.append((f"k8s {where}", [*head, *tail]))
    return found


def readme_commands() -> list[tuple[str, Argv]]:
    """``lorafleet ...`` and ``python -m services.scheduler ...`` in the README's code blocks: at the start of a
    line, after ``--`` (kubectl exec) or after a compose service name (compose exec)."""
    text = (INFRA / "README.md").read_text()
    services = set(compose()["services"])
    found: list[tuple[str, Argv]] = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            for i, token in enumerate(tokens):
                starts = i == 0 or tokens[i - 1] == "--" or tokens[i - 1] in services
                if starts and (
                    token == "lorafleet" or tokens[i : i + 3] == ["python", "-m", "services.scheduler"]
                ):
                    end = next(
                        (j for j in range(i, len(tokens)) if tokens[j] in ("&&", "||", "|", ";")), len(tokens)
                    )
                    found.append((f"README: {line.strip()}", tokens[i:end]))
    return found


def parse_run(argv: Argv) -> Any:
    """Parse ``argv`` with the real parser of the program it names (a parse error fails the test)."""
    try:
        if argv[0] == "lorafleet":
            return build_parser().parse_args(argv[1:])
        if argv[:3] == ["python", "-m", "services.scheduler"]:
            from services.scheduler.__main__ import _parser

            return _parser().parse_args(argv[3:])
        if argv[:2] == ["ray", "start"]:
            from ray.scripts.scripts import start

            return start.make_context("ray start", argv[2:]).params
    except SystemExit as exc:
        pytest.fail(f"{shlex.join(argv)}: the parser refused it (exit {exc.code})")
    pytest.fail(f"{shlex.join(argv)}: not a command these tests know how to check")


def runs_by_where() -> dict[str, Argv]:
    return dict(runs())


# --- the tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)
    if path.parent == K8S:
        assert [(d["apiVersion"], d["kind"]) for d in docs] == EXPECTED_K8S[path.name]


def test_the_kustomization_lists_every_manifest_once() -> None:
    (kustomization,) = load_all(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(set(EXPECTED_K8S) - {"kustomization.yaml"})
    assert sorted(p.name for p in K8S.glob("*.y*ml")) == sorted(EXPECTED_K8S)
    assert kustomization["namespace"] == k8s_object("Namespace")["metadata"]["name"]
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_manifests_with_one_image() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rendered = list(yaml.safe_load_all(done.stdout))
    (image,) = load_all(K8S / "kustomization.yaml")[0]["images"]
    images = set(re.findall(r"^\s*-?\s*image: (\S+)$", done.stdout, flags=re.M))
    assert images == {f"{image['newName']}:{image['newTag']}"}
    assert {doc["metadata"].get("namespace") for doc in rendered if doc["kind"] != "Namespace"} == {
        "lorafleet"
    }


def test_every_pod_runs_the_one_image_as_a_non_root_user() -> None:
    for where, spec in pod_specs():
        assert [c["image"] for c in spec["containers"]] == [IMAGE] * len(spec["containers"]), where
        assert (
            spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        ), where
    user = docker_values("USER")[-1]
    assert user not in ("root", "0")


def test_deployment_selectors_and_service_match_the_pod_labels() -> None:
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment",):
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items(), obj["metadata"]["name"]
    service, api = k8s_object("Service", "lorafleet-api"), k8s_object("Deployment", "lorafleet-api")
    assert service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    (port,) = api["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_lorafleet_variables_named_anywhere_in_infra_are_real_settings() -> None:
    named = {
        (path.relative_to(INFRA).as_posix(), var)
        for path in INFRA.rglob("*")
        if path.is_file()
        for var in re.findall(r"\bLORAFLEET_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())
    }
    assert named, "no LORAFLEET_ variable found at all"
    unknown = sorted((where, var) for where, var in named if var not in SETTINGS_VARS | set(EXTRA_VARS))
    assert not unknown, f"not fields of lorafleet.config.Settings: {unknown}"
    for var, reader in EXTRA_VARS.items():
        assert f'"{var}"' in reader.read_text(), f"{var} is no longer read by {reader}"


def set_variables() -> dict[str, set[str]]:
    """Every variable the files *set*: where -> names."""
    found: dict[str, set[str]] = {"Dockerfile": set(docker_key_values("ENV"))}
    for name, service in compose()["services"].items():
        found[f"compose {name}"] = set(compose_env(service))
    for where, container in containers():
        found[f"k8s {where}"] = set(container_env(container))
    return found


def test_the_readme_table_covers_every_lorafleet_variable_the_files_set() -> None:
    table = set(re.findall(r"^\| `(LORAFLEET_[A-Z0-9_]+)` \|", (INFRA / "README.md").read_text(), flags=re.M))
    used = {var for names in set_variables().values() for var in names if var.startswith("LORAFLEET_")}
    missing = sorted(used - table)
    assert not missing, f"set in infra/ but missing from the settings table of infra/README.md: {missing}"


def load_env(monkeypatch: pytest.MonkeyPatch, env: Env) -> Settings:
    """``load_settings()`` under exactly ``env`` (other LORAFLEET_* variables of this process removed)."""
    for name in [n for n in os.environ if n.startswith("LORAFLEET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_every_kubernetes_container_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for where, container in containers():
        env = container_env(container)
        with monkeypatch.context() as patch:
            settings = load_env(patch, env)
        assert settings.object_store_url.startswith("s3://"), where
        if "LORAFLEET_DATABASE_URL" in env:
            assert settings.database_url.startswith("postgresql+psycopg://"), where


def test_every_compose_environment_is_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in project_services().items():
        with monkeypatch.context() as patch:
            settings = load_env(patch, compose_env(service))
        assert settings.database_url.startswith("postgresql+psycopg://lorafleet:"), name
        assert settings.object_store_url == f"s3://{env_file()['S3_BUCKET']}/adapters", name
        assert settings.s3_endpoint_url == "http://minio:9000", name


def test_the_secrets_hold_only_placeholders() -> None:
    for obj in k8s_objects():
        if obj["kind"] == "Secret":
            assert "data" not in obj, "base64 data would hide what is committed"
            for key, value in obj["stringData"].items():
                assert "CHANGE_ME" in value, f"{obj['metadata']['name']}.{key} looks like a real secret"


@pytest.mark.parametrize("where", [where for where, _ in runs()])
def test_every_command_the_files_run_parses(where: str) -> None:
    parse_run(runs_by_where()[where])


def test_every_command_in_the_readme_parses() -> None:
    commands = readme_commands()
    first_words = {" ".join(argv[:2]) for _, argv in commands}
    assert {"lorafleet db", "lorafleet rollback", "lorafleet tenants", "lorafleet versions"} <= first_words
    for where, argv in commands:
        assert parse_run(argv) is not None, where


def test_the_roles_run_the_commands_a_cluster_needs() -> None:
    by_where = runs_by_where()
    for api in ("compose api", "k8s Deployment/lorafleet-api api"):
        args = parse_run(by_where[api])
        # no trainer actors (--workers defaults to 1) and no scheduler inside the API process
        assert (args.command, args.workers, args.no_scheduler, args.host) == ("serve", 0, True, "0.0.0.0"), (
            api
        )
    for where, argv in [
        ("compose migrate", ["db", "upgrade"]),
        ("k8s Job/lorafleet-db-migrate migrate", ["db", "upgrade"]),
    ]:
        assert by_where[where] == ["lorafleet", *argv]
    for where in ("compose trainers", "k8s Deployment/lorafleet-trainers trainers"):
        assert parse_run(by_where[where]).command == "workers", where
    for where in ("compose scheduler", "k8s Deployment/lorafleet-scheduler scheduler"):
        assert by_where[where][:3] == ["python", "-m", "services.scheduler"], where
    assert parse_run(by_where["compose serve-deploy"]).command == "serve-deploy"


def test_the_scheduler_groups_no_more_users_than_a_trainer_has_slots() -> None:
    args = parse_run(runs_by_where()["k8s Deployment/lorafleet-scheduler scheduler"])
    slots = int(k8s_object("ConfigMap")["data"].get("LORAFLEET_TRAINER_SLOTS", Settings().trainer_slots))
    assert args.users_per_job <= slots


def test_the_image_entry_points_start(tmp_path: Path) -> None:
    """The installed console script and module, started outside the checkout as in the image."""
    bin_dir = Path(sys.executable).parent
    (entrypoint,) = docker_exec_form("ENTRYPOINT")
    for argv in (
        [str(bin_dir / entrypoint), "--help"],
        [sys.executable, "-m", "services.scheduler", "--help"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"
        assert "usage:" in done.stdout


def test_the_dockerfile_builds_one_image_for_both_variants() -> None:
    bases = {name: image for image, _, name in (rest.partition(" AS ") for rest in docker_values("FROM"))}
    assert bases["runtime"] == "base-${VARIANT}"
    assert bases["base-cpu"] == "${PYTHON_IMAGE}" and bases["base-cuda"] == "${CUDA_IMAGE}"
    args = docker_key_values("ARG")
    assert args["VARIANT"] == "cpu"
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim") and args["CUDA_IMAGE"].startswith(
        "nvidia/cuda:"
    )
    makefile_torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text())
    assert makefile_torch is not None and args["TORCH_VERSION"] == makefile_torch.group(1)
    assert "https://download.pytorch.org/whl/cpu" in (INFRA / "Dockerfile").read_text()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert (
        docker_exec_form("ENTRYPOINT") == ["lorafleet"]
        and scripts["lorafleet"] == "lorafleet.entrypoints.cli:main"
    )


def test_the_dockerfile_copies_what_exists_and_points_at_the_migrations() -> None:
    lines = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = {line for line in lines if line and not line.startswith("#")}
    assert ".venv" in ignored
    copied: dict[str, str] = {}
    for rest in docker_values("COPY"):
        *sources, target = shlex.split(rest)
        for source in sources:
            assert (REPO / source).exists() and source not in ignored, source
            copied[source] = target
    assert docker_key_values("ENV")["LORAFLEET_MIGRATIONS_DIR"] == copied["migrations"]
    assert (REPO / "migrations/env.py").is_file()


def test_the_healthcheck_asks_the_api_port_for_healthz() -> None:
    (healthcheck,) = docker_values("HEALTHCHECK")
    port = build_parser().parse_args(docker_exec_form("CMD")).port
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck
    api = k8s_object("Deployment", "lorafleet-api")["spec"]["template"]["spec"]["containers"][0]
    (container_port,) = api["ports"]
    assert container_port["containerPort"] == parse_run(["lorafleet", *api["args"]]).port
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": container_port["name"]}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": container_port["name"]}


def test_the_ray_version_is_the_pinned_and_tested_one() -> None:
    pinned = docker_key_values("ARG")["RAY_VERSION"]
    assert {
        k8s_object(kind)["spec"].get("rayClusterConfig", k8s_object(kind)["spec"])["rayVersion"]
        for kind in ("RayCluster", "RayService")
    } == {pinned}
    assert metadata.version("ray") == pinned, "the image pins a Ray these tests did not run with"
    requirement = next(r for r in metadata.requires("lorafleet") or [] if r.startswith("ray"))
    assert "serve" in requirement and "default" in requirement, requirement


def test_ray_start_parameters_parse_and_offer_the_trainer_resource() -> None:
    trainer_resource = k8s_object("ConfigMap")["data"]["LORAFLEET_TRAINER_RESOURCE"]
    for where, head, group in ray_groups():
        params = group["rayStartParams"]
        argv = ["ray", "start", "--head" if head else "--address=head:6379", "--block"]
        # KubeRay pastes each parameter into a shell command line: `--name=value`, shell quoting and all
        argv += [token for key, value in params.items() for token in shlex.split(f"--{key}={value}")]
        parsed = parse_run(argv)
        resources = json.loads(parsed["resources"]) if parsed["resources"] else {}
        if where.startswith("RayCluster") and not head:
            assert resources == {trainer_resource: 1}, where
        else:
            assert trainer_resource not in resources, f"{where} must not take trainer actors"
        gpus = group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus is not None) == (group.get("groupName") == "gpu"), where


def test_the_device_setting_matches_the_worker_groups() -> None:
    """With ``cuda`` every actor and replica asks Ray for a GPU: the groups that run them must have GPUs."""
    device = k8s_object("ConfigMap")["data"]["LORAFLEET_DEVICE"]
    running = [(where, g) for where, head, g in ray_groups() if not head and g["replicas"] > 0]
    assert {where.split()[0] for where, _ in running} == {"RayCluster", "RayService"}, (
        "a cluster has no workers"
    )
    for where, group in running:
        limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        if device.startswith("cuda"):
            assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"{where}: LORAFLEET_DEVICE={device} but no GPU"


def test_compose_ray_nodes_parse_and_offer_the_trainer_resource() -> None:
    by_where = runs_by_where()
    head, worker = parse_run(by_where["compose ray-head"]), parse_run(by_where["compose ray-worker"])
    assert head["head"] and head["block"] and not worker["head"] and worker["block"]
    assert json.loads(worker["resources"]) == {"lorafleet_trainer": 1}
    address = compose_env(project_services()["api"])["LORAFLEET_RAY_ADDRESS"]
    assert address == f"ray://ray-head:{head['ray_client_server_port']}"
    assert worker["address"] == f"ray-head:{head['port']}"


def test_the_ray_addresses_name_kuberays_head_services() -> None:
    """KubeRay calls a cluster's head Service ``<RayCluster or RayService name>-head-svc``."""
    configured = k8s_object("ConfigMap")["data"]["LORAFLEET_RAY_ADDRESS"]
    train, serve = k8s_object("RayCluster")["metadata"]["name"], k8s_object("RayService")["metadata"]["name"]
    for where, container in containers():
        if where.startswith("Deployment/lorafleet-trainers"):
            assert (
                container_env(container)["LORAFLEET_RAY_ADDRESS"]
                == configured
                == f"ray://{train}-head-svc:10001"
            )
        if where.startswith("Deployment/lorafleet-api"):
            assert container_env(container)["LORAFLEET_RAY_ADDRESS"] == f"ray://{serve}-head-svc:10001"
    for where, head, group in ray_groups():
        if head:
            ports = {
                p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]
            }
            assert ports["client"] == 10001 and ports["gcs-server"] == 6379, where


def serve_app() -> dict[str, Any]:
    config = yaml.safe_load(k8s_object("RayService")["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert isinstance(app, dict)
    return app


def test_the_serve_config_is_valid_and_names_the_configured_app() -> None:
    app = serve_app()
    assert app["name"] == k8s_object("ConfigMap")["data"]["LORAFLEET_SERVE_APP_NAME"]
    assert app["import_path"] == "lorafleet.runtime.ray_serve:build_app"
    unknown = set(app["args"].get("settings", {})) - set(Settings.model_fields)
    assert not unknown, f"serveConfigV2 args.settings: not Settings fields: {unknown}"


def test_the_serve_import_path_builds_the_app_from_its_args(monkeypatch: pytest.MonkeyPatch) -> None:
    app = serve_app()
    module_name, _, attribute = app["import_path"].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        pytest.skip(f"{module_name} does not exist yet")
    build_app = getattr(module, attribute)
    assert callable(build_app)
    worker = next(g for where, head, g in ray_groups() if where.startswith("RayService") and not head)
    load_env(monkeypatch, container_env(worker["template"]["spec"]["containers"][0]))
    from ray.serve import Application

    built = build_app(app["args"])
    assert isinstance(built, Application)
    wanted = app["args"]["settings"]
    autoscaling = built._bound_deployment._deployment_config.autoscaling_config
    assert autoscaling is not None, "serve_max_replicas is set, so the deployment autoscales"
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (
        wanted["serve_replicas"],
        wanted["serve_max_replicas"],
    )


def test_compose_runs_the_migration_before_what_opens_the_database() -> None:
    services = compose()["services"]
    conditions = {
        name: {dep: spec["condition"] for dep, spec in (service.get("depends_on") or {}).items()}
        for name, service in services.items()
    }
    for name, deps in conditions.items():
        assert set(deps) <= set(services), f"{name} depends on a service that does not exist"
    assert conditions["migrate"]["postgres"] == "service_healthy"
    assert (
        compose_env(services["migrate"])["LORAFLEET_DATABASE_URL"].rsplit("@", 1)[1].startswith("postgres:")
    )
    for name in ("api", "scheduler", "trainers", "serve-deploy"):
        assert conditions[name]["migrate"] == "service_completed_successfully", name
    for name in ("api", "trainers", "serve-deploy"):
        assert conditions[name]["create-bucket"] == "service_completed_successfully", name
    assert conditions["create-bucket"]["minio"] == "service_healthy"
    order = topological_order(conditions)
    assert order.index("migrate") < min(
        order.index(n) for n in ("api", "scheduler", "trainers", "serve-deploy")
    )


def topological_order(graph: dict[str, dict[str, str]]) -> list[str]:
    """Services in start order; a dependency cycle fails the test."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"depends_on cycle through {name}"
        visiting.add(name)
        for dep in graph[name]:
            visit(dep)
        order.append(name)

    for name in graph:
        visit(name)
    return order


def test_compose_interpolates_only_variables_of_the_env_example() -> None:
    text = (INFRA / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used == set(env_file()), "infra/.env.example and the ${...} of compose.yaml differ"


def test_the_setup_phase_is_the_configuration_and_the_migration() -> None:
    """The README applies ``-l lorafleet/phase=setup`` first: it must select exactly these objects."""
    setup = {
        (o["kind"], o["metadata"]["name"])
        for o in k8s_objects()
        if o["metadata"].get("labels", {}).get("lorafleet/phase") == "setup"
    }
    assert {kind for kind, _ in setup} == {"Namespace", "ConfigMap", "Secret", "Job"}
    assert len(setup) == len(
        [o for o in k8s_objects() if o["kind"] in ("Namespace", "ConfigMap", "Secret", "Job")]
    )
    assert "-l lorafleet/phase=setup" in (INFRA / "README.md").read_text()


def test_every_data_file_of_the_packages_is_package_data() -> None:
    """The image installs a wheel, not the source tree: a data file (the shipped base answers, the console's
    templates) that no ``package-data`` pattern names would be missing there and nowhere else."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    roots = {"lorafleet": REPO / "platform" / "lorafleet", "services.console": REPO / "services" / "console"}
    assert set(package_data) == set(roots)
    for package, root in roots.items():
        data = {
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
        }
        assert data, package
        unmatched = [p for p in data if not any(fnmatch(p, pattern) for pattern in package_data[package])]
        assert unmatched == [], (package, unmatched)
