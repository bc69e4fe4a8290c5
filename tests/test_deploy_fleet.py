"""The fleet's deployment files: every Kubernetes manifest against the
Kubernetes schemas (kubernetes-validate), the compose file against the Compose
specification's schema (check-jsonschema's vendored copy), the HAProxy and
Prometheus configs by their own tools, and the facts the drain depends on
(grace periods, probes, resources, replicas) checked across files."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import read_providers_file
from tests.gateway_support import REPO

K8S = REPO / "deploy" / "kubernetes" / "base"
GPU = REPO / "deploy" / "kubernetes" / "overlays" / "gpu"
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
K8S_VERSIONS = ["1.29.0", "1.37.0"]  # the oldest supported here and the newest schema shipped
BASE_MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
GPU_MANIFESTS = [GPU / "klein-local.yaml"]  # the overlay's own objects (its patch is not one)
MANIFESTS = BASE_MANIFESTS + GPU_MANIFESTS


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for p in MANIFESTS for d in docs(p)}


def grace_s() -> float:
    return read_providers_file(REPO / "providers.yaml").gateway.shutdown_grace_s


# ---- Kubernetes ----------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_kubernetes_manifest_validates_against_the_schemas(path: Path, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in docs(path):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        ({"spec": {"replicas": "three"}}, "replicas is an integer"),
        ({"spec": {"template": {"spec": {"terminationGracePeriod": 40}}}}, "a misspelt field"),
    ],
    ids=["wrong-type", "unknown-field"],
)
def test_the_kubernetes_check_rejects_a_broken_deployment(broken: dict[str, Any], why: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = merge(objects()[("Deployment", "gateway")], broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    assert sorted(kustomization(K8S)["resources"]) == [p.name for p in BASE_MANIFESTS]
    assert kustomization(GPU)["resources"] == ["../../base", *(p.name for p in GPU_MANIFESTS)]


def test_the_base_needs_no_gpu_and_points_the_gateway_at_no_local_backend() -> None:
    for (kind, name), obj in objects().items():
        if kind == "Deployment" and name != "klein-local":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), name
    assert all(obj["metadata"]["name"] != "klein-local" for p in BASE_MANIFESTS for obj in docs(p))
    assert "KLEIN_LOCAL_URL" not in objects()[("ConfigMap", "gateway-env")]["data"]


def test_the_gateway_env_carries_a_public_base_url_to_set() -> None:
    text = (K8S / "configmap-env.yaml").read_text()
    url = objects()[("ConfigMap", "gateway-env")]["data"]["KLEIN_PUBLIC_BASE_URL"]
    assert url.startswith("https://")
    assert re.search(r"#.*\bSET THIS\b", text, re.IGNORECASE), "the placeholder must say it is to be set"


def manifest_images() -> dict[str, str]:
    """Each container image the manifests name, and the tag they give it."""
    found: dict[str, str] = {}
    for (kind, _), obj in objects().items():
        if kind == "Deployment":
            for c in obj["spec"]["template"]["spec"]["containers"]:
                name, _, tag = c["image"].partition(":")
                found[name] = tag
    return found


def test_every_image_tag_is_set_in_a_kustomization_and_matches_the_manifest() -> None:
    images = {i["name"]: i["newTag"] for d in (K8S, GPU) for i in kustomization(d).get("images", [])}
    assert images == manifest_images()
    assert all(tag and tag != "latest" for tag in images.values()), images


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its built-in kustomize builds deploy/kubernetes)")
    built = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(built) if d]


@pytest.mark.parametrize(("directory", "manifests"), [(K8S, BASE_MANIFESTS), (GPU, MANIFESTS)], ids=["base", "gpu"])
def test_kustomize_builds_the_manifests_into_one_namespace(directory: Path, manifests: list[Path]) -> None:
    out = kustomize(directory)
    assert len(out) == sum(len(docs(p)) for p in manifests)
    assert {d["metadata"].get("namespace") for d in out if d["kind"] != "Namespace"} == {"klein"}
    assert all(":" in c["image"] and not c["image"].endswith(":latest") for d in out if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"])


def test_the_gpu_overlay_points_the_gateway_at_its_local_backend() -> None:
    env = next(d for d in kustomize(GPU) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "gateway-env")["data"]
    service = objects()[("Service", "klein-local")]
    port = service["spec"]["ports"][0]["port"]
    assert env["KLEIN_LOCAL_URL"] == f"http://klein-local:{port}"
    assert env["KLEIN_PUBLIC_BASE_URL"], "the overlay keeps the base's settings"


def test_the_config_maps_carry_the_current_providers_yaml_and_pricing() -> None:
    sys.path.insert(0, str(K8S.parent))
    try:
        import render_config
    finally:
        sys.path.remove(str(K8S.parent))
    for path, text in render_config.rendered().items():
        assert path.read_text() == text, f"{path.name} is stale: run python deploy/kubernetes/render_config.py"
    pricing = objects()[("ConfigMap", "gateway-pricing")]["data"]
    assert set(pricing) == {p.name for p in (REPO / "pricing").glob("*.yaml")}


def test_the_gateway_pods_drain_before_kubernetes_kills_them() -> None:
    """preStop (endpoints catch up) + the drain must fit in the termination grace."""
    pod = objects()[("Deployment", "gateway")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + grace_s() + 5


@pytest.mark.parametrize(
    ("deployment", "probe", "path"),
    [
        ("gateway", "readinessProbe", "/readyz"),
        ("gateway", "livenessProbe", "/healthz"),
        ("klein-local", "readinessProbe", "/health/ready"),
        ("klein-local", "livenessProbe", "/health/live"),
    ],
)
def test_probes_ask_the_right_endpoint(deployment: str, probe: str, path: str) -> None:
    (container,) = objects()[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]
    assert container[probe]["httpGet"]["path"] == path


def test_every_container_sets_requests_and_limits_and_runs_as_non_root() -> None:
    for (kind, name), obj in objects().items():
        if kind != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for c in pod["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name


def test_the_gpu_deployment_holds_one_gpu_per_pod() -> None:
    dep = objects()[("Deployment", "klein-local")]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert dep["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize(("kind", "name"), [("Service", "gateway"), ("PodDisruptionBudget", "gateway"), ("Service", "klein-local"), ("Service", "redis")])
def test_selectors_match_the_pods_they_mean(kind: str, name: str) -> None:
    objs = objects()
    spec = objs[(kind, name)]["spec"]
    selector = spec["selector"].get("matchLabels", spec["selector"])
    labels = objs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_the_autoscaler_keeps_room_for_a_disruption() -> None:
    objs = objects()
    hpa = objs[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "gateway"
    assert hpa["minReplicas"] > objs[("PodDisruptionBudget", "gateway")]["spec"]["maxUnavailable"]


def test_the_gateway_pods_share_an_image_store_and_a_signing_key() -> None:
    env = objects()[("ConfigMap", "gateway-env")]["data"]
    secret = objects()[("Secret", "gateway-secrets")]["stringData"]
    assert env["KLEIN_IMAGE_STORE"] == "s3" and env["KLEIN_S3_BUCKET"]
    assert "KLEIN_URL_SIGNING_KEY" in secret


# ---- compose --------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    if not Path(exe).exists():
        pytest.skip("check-jsonschema is in the dev extra")
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120, check=False)


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_rejects_a_broken_file(tmp_path: Path) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    raw["services"]["gateway"]["deploy"]["replicas"] = "three"
    raw["services"]["gateway"]["stop_grace"] = "35s"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(raw))
    assert check_compose(broken).returncode != 0


def test_compose_runs_three_replicas_that_outlast_their_drain() -> None:
    gateway = yaml.safe_load(COMPOSE.read_text())["services"]["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert seconds(gateway["stop_grace_period"]) >= grace_s() + 5


def test_compose_gpu_service_is_optional_and_reserves_a_gpu() -> None:
    local = yaml.safe_load(COMPOSE.read_text())["services"]["klein-local"]
    assert local["profiles"] == ["gpu"]
    (device,) = local["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])


def test_every_file_compose_mounts_or_builds_exists() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts {source}, which does not exist"
        if "build" in svc:
            assert (COMPOSE_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]).exists(), name


def test_the_compose_haproxy_config_is_valid_and_checks_readiness() -> None:
    text = (COMPOSE_DIR / "haproxy.cfg").read_text()
    assert "option httpchk GET /readyz" in text and "retry-on" in text
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    result = subprocess.run([haproxy, "-c", "-f", str(COMPOSE_DIR / "haproxy.cfg")], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_prometheus_config_loads_the_shipped_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    shutil.copy(COMPOSE_DIR / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Dockerfiles ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.local"])
def test_dockerfiles_are_multi_stage_non_root_with_a_health_check(name: str) -> None:
    lines = [line.strip() for line in (REPO / name).read_text().splitlines() if line.strip() and not line.startswith("#")]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) >= 2
    final = lines[stages[-1] :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") for line in final)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"


def test_the_gpu_image_builds_on_cuda() -> None:
    text = (REPO / "Dockerfile.local").read_text()
    base = re.search(r"^ARG BASE=(\S+)", text, re.MULTILINE)
    assert base and "cuda" in base.group(1)


# ---- helpers ----------------------------------------------------------------------


def merge(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    for key, value in patch.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))
