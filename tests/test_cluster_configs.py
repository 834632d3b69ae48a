"""The deployment files under cluster/ are valid and say what cluster/README.md promises.

Ray cluster launcher files go through the validation that `ray up` itself runs before it touches a
cloud: ``prepare_config`` (merge with the provider's defaults.yaml) then ``validate_config`` (the
JSON schema ``ray/autoscaler/ray-schema.json`` plus Ray's own checks), both from
``ray.autoscaler._private.util``. No cloud access. The KubeRay and MLflow manifests and the
docker-compose file are checked for the structure the how-to relies on.
"""

from __future__ import annotations

import configparser
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHERS = {"aws.yaml": "aws", "gcp.yaml": "gcp"}
SETTINGS_CONFIGMAP = "pfe-study-settings"
MLFLOW_SECRET = "pfe-mlflow-credentials"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _prepared(name: str) -> dict[str, Any]:
    """The launcher file as `ray up` sees it after merging Ray's provider defaults."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(_yaml(CLUSTER / name)))


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != config["head_node_type"] and node["resources"].get("GPU", 0) >= 1
    }


def _env_names(container: dict[str, Any]) -> tuple[set[str], set[str]]:
    """ConfigMap and Secret names a container takes its environment from (envFrom)."""
    maps = {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
    secrets = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    return maps, secrets


# ---- Ray cluster launcher (AWS, GCP) ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_passes_rays_own_validation(name: str) -> None:
    from ray.autoscaler._private.util import validate_config

    config = _prepared(name)
    validate_config(config)  # raises jsonschema.ValidationError / ValueError on a bad file
    assert config["provider"]["type"] == LAUNCHERS[name]


def test_validation_catches_a_broken_launcher_file() -> None:
    """The check above has teeth: Ray's validator refuses a typo'd key and a fractional resource."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    good = _yaml(CLUSTER / "aws.yaml")
    typo = copy.deepcopy(good)
    typo["available_node_types"]["gpu_worker"]["max_worker"] = 4
    fractional = copy.deepcopy(good)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    for bad in (typo, fractional):
        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config(bad))


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_cpu_head_and_autoscaling_gpu_workers(name: str) -> None:
    config = _prepared(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0, "no trial may land on the head"
    workers = _gpu_worker_types(config)
    assert workers, f"{name}: no GPU worker type"
    for worker in workers.values():
        assert worker["min_workers"] == 0
        assert 1 <= worker["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_installs_the_project_with_its_pins(name: str) -> None:
    config = _prepared(name)
    assert config["file_mounts"]["~/pfe-study"] == "."
    setup = " && ".join(config["setup_commands"])
    assert "pip install" in setup and "~/pfe-study" in setup and "constraints.txt" in setup
    # defaults.yaml is merged shallowly: every list we rely on must be ours, not Ray's nightly wheel.
    merged = config["head_setup_commands"] + config["worker_setup_commands"]
    assert not any("ray-wheels" in command for command in merged)
    # No unanchored exclude that would drop a package folder such as pfe/data.
    for pattern in config["rsync_exclude"]:
        assert pattern.startswith(("/", "**/")), pattern


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_guards_access_and_takes_settings_from_the_env_file(name: str) -> None:
    config = _prepared(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start
        assert ". ~/pfe-cluster.env" in start
    assert "--dashboard-host=127.0.0.1" in head_start
    text = (CLUSTER / name).read_text()
    assert "MLFLOW_TRACKING_PASSWORD" not in text and "AWS_SECRET_ACCESS_KEY" not in text


def test_launcher_files_use_the_same_ray_as_the_kuberay_manifests() -> None:
    tags = set()
    for name in LAUNCHERS:
        docker = _yaml(CLUSTER / name)["docker"]
        tags |= {docker["head_image"].split(":")[1].split("-")[0], docker["worker_image"].split(":")[1].split("-")[0]}
    tags.add(_docs(CLUSTER / "k8s" / "raycluster.yaml")[0]["spec"]["rayVersion"])
    tags.add(_docs(CLUSTER / "k8s" / "rayjob.yaml")[0]["spec"]["rayClusterSpec"]["rayVersion"])
    tags.add(re.search(r"FROM rayproject/ray:([0-9.]+)-", (CLUSTER / "Dockerfile").read_text()).group(1))
    assert len(tags) == 1, tags
    major, minor = (int(part) for part in tags.pop().split(".")[:2])
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray >= 2.52"


def test_cluster_env_example_names_a_server_and_shared_storage() -> None:
    values = dict(
        line.split("=", 1)
        for line in (CLUSTER / "cluster.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert values["PFE_STORAGE"].startswith(("s3://", "gs://"))
    assert values["MLFLOW_TRACKING_PASSWORD"] == ""


# ---- KubeRay ------------------------------------------------------------------------------------


def _check_ray_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    assert any(group["minReplicas"] == 0 and group["maxReplicas"] >= 1 for group in gpu_groups)
    for container in [head_container] + [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]:
        maps, secrets = _env_names(container)
        assert SETTINGS_CONFIGMAP in maps and MLFLOW_SECRET in secrets, container["name"]


def test_raycluster_manifest() -> None:
    (cluster,) = _docs(CLUSTER / "k8s" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    _check_ray_cluster_spec(cluster["spec"])


def test_rayjob_runs_a_study_with_settings_from_configmap_and_secret() -> None:
    (job,) = _docs(CLUSTER / "k8s" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    command = spec["entrypoint"].split()
    assert command[:2] == ["pfe-study", "run"] and command[2].startswith("studies/") and command[2].endswith(".yaml")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/pfe-study"
    assert spec["backoffLimit"] >= 1, "a retry resumes the study"
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_settings_configmap_points_at_a_server_and_shared_storage() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(CLUSTER / "k8s" / "settings.yaml")}
    data = docs[("ConfigMap", SETTINGS_CONFIGMAP)]["data"]
    assert data["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert data["PFE_STORAGE"].startswith(("s3://", "gs://"))
    assert ("ServiceAccount", "pfe-ray") in docs


def test_kubernetes_manifests_parse_and_commit_no_secret() -> None:
    paths = sorted((CLUSTER / "k8s").glob("*.yaml")) + sorted((CLUSTER / "mlflow" / "k8s").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        for doc in _docs(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            assert doc["kind"] != "Secret", f"{path}: create Secrets with kubectl, never commit them"


# ---- MLflow tracking server ---------------------------------------------------------------------


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _check_secret_env(env: dict[str, Any], where: str) -> None:
    """Secret-looking variables are interpolated or referenced, never written in the file."""
    for key, value in env.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", key):
            assert isinstance(value, str) and value.startswith("${"), f"{where}: {key} is hard-coded"


def test_mlflow_compose_stack() -> None:
    compose = _yaml(CLUSTER / "mlflow" / "docker-compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    store = services["s3"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(store["environment"])
    mlflow = services["mlflow"]
    args = [str(a) for a in mlflow["command"]]
    assert args[:2] == ["mlflow", "server"]
    assert _flag(args, "--backend-store-uri").startswith("postgresql")
    assert _flag(args, "--app-name") == "basic-auth"
    assert 1 <= int(_flag(args, "--workers")) <= 4
    assert _flag(args, "--artifacts-destination").startswith("s3://")
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Published only on loopback by default; Postgres and the store publish nothing.
    assert mlflow["ports"] == ["${MLFLOW_BIND_ADDRESS:-127.0.0.1}:5000:5000"]
    assert "ports" not in services["postgres"] and "ports" not in store
    for name, service in services.items():
        _check_secret_env(service.get("environment", {}), f"docker-compose service {name}")


def test_mlflow_auth_config_holds_no_password() -> None:
    k8s = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "mlflow" / "k8s" / "mlflow.yaml")}
    for text, where in (
        ((CLUSTER / "mlflow" / "basic_auth.ini").read_text(), "basic_auth.ini"),
        (k8s["mlflow-auth-config"]["data"]["basic_auth.ini"], "k8s mlflow-auth-config"),
    ):
        ini = configparser.ConfigParser()
        ini.read_string(text)
        section = ini["mlflow"]
        assert section["database_uri"].startswith("postgresql"), where
        assert "@" in section["database_uri"] and ":" not in section["database_uri"].split("//")[1].split("@")[0], where
        assert not section.get("admin_password"), where


def test_mlflow_kubernetes_manifests() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs(CLUSTER / "mlflow" / "k8s" / "mlflow.yaml")}
    docs |= {(d["kind"], d["metadata"]["name"]): d for d in _docs(CLUSTER / "mlflow" / "k8s" / "postgres.yaml")}
    service = docs[("Service", "mlflow")]
    assert service["spec"]["type"] == "ClusterIP"
    container = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = [str(a) for a in container["args"]]
    assert args[:2] == ["mlflow", "server"]
    assert _flag(args, "--app-name") == "basic-auth"
    assert _flag(args, "--backend-store-uri").startswith("postgresql")
    assert 1 <= int(_flag(args, "--workers")) <= 4
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert {"mlflow-postgres", "mlflow-admin"} <= secret_refs
    assert all("value" not in e for e in container["env"] if re.search(r"PASSWORD|SECRET", e["name"]))
    postgres = docs[("StatefulSet", "mlflow-postgres")]["spec"]["template"]["spec"]["containers"][0]
    assert any(e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "mlflow-postgres" for e in postgres["env"])
    assert ("NetworkPolicy", "mlflow-from-pfe-study") in docs


def test_readme_names_the_files_and_commands() -> None:
    readme = (CLUSTER / "README.md").read_text()
    for needle in (
        "ray up cluster/aws.yaml",
        "ray up cluster/gcp.yaml",
        "ray job submit",
        "--working-dir .",
        "pfe-study run studies/table3.yaml",
        "kubectl -n pfe apply -f cluster/k8s/rayjob.yaml",
        "kubectl -n pfe apply -f cluster/k8s/raycluster.yaml",
        "cluster/mlflow/k8s",
        "docker compose",
        "RAY_AUTH_MODE=token",
        "gpu: 0.5",
    ):
        assert needle in readme, needle
