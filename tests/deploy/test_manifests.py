"""deploy/, the Grafana dashboard and the Dockerfile, through tools/validate_manifests.py.

The positive tests run every check on the real files; the negative ones feed deliberately broken
manifests and assert that the validator reports them, so each check is shown able to fail.
Offline: the Kubernetes schemas ship inside the kubernetes-validate package.
"""

from __future__ import annotations

import copy
import importlib.util
import json
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


def _render(name: str) -> list[Resource]:
    resources: list[Resource] = vm.render_target(TARGETS[name])
    return copy.deepcopy(resources)


def _get(resources: list[Resource], kind: str) -> Resource:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


def _server(resources: list[Resource]) -> Resource:
    pod: Resource = _get(resources, "Deployment")["spec"]["template"]["spec"]
    container: Resource = pod["containers"][0]
    return container


def _mentions(problems: list[str], text: str) -> bool:
    return any(text in problem for problem in problems)


# ----------------------------------------------------------------------- the real files


def test_kubernetes_validate_has_the_schemas_offline() -> None:
    import kubernetes_validate.utils

    shipped = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert {v.rsplit(".", 1)[0] for v in vm.KUBERNETES_VERSIONS} <= shipped


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_renders_and_validates(name: str) -> None:
    assert vm.validate_target(TARGETS[name], use_kubectl=False) == []


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_kubectl_kustomize_renders_the_same(name: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not on PATH; the built-in renderer is checked by the other tests")
    target = TARGETS[name]
    assert vm.compare_renders(vm.render_target(target), vm.kubectl_render(target)) == []


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
    pod = _get(resources, "Deployment")["spec"]["template"]["spec"]
    grace = int(_get(resources, "ConfigMap")["data"]["TRANSFER_GRACE_SECONDS"])
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["terminationGracePeriodSeconds"] > sleep + grace


def test_gpu_overlay_requests_a_gpu_and_cpu_does_not() -> None:
    gpu, cpu = _render("gpu"), _render("cpu")
    assert _server(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _get(gpu, "ConfigMap")["data"]["TRANSFER_DEVICE"] == "cuda"
    gpu_pod = _get(gpu, "Deployment")["spec"]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
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


def test_command_line_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main([]) == 0
    assert "deploy/ OK" in capsys.readouterr().out


# ----------------------------------------------------------------------- negative tests


def test_reports_a_grace_period_too_short() -> None:
    resources = _render("cpu")
    _get(resources, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20
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
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "readinessProbe must be a gRPC probe")
    assert _mentions(problems, "livenessProbe probes port 9090")


def test_reports_a_gpu_target_without_a_gpu() -> None:
    problems = vm.check_invariants(_render("cpu"), expect_gpu=True)
    assert _mentions(problems, "resources.limits.nvidia.com/gpu")
    assert _mentions(problems, "TRANSFER_DEVICE=cuda")
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
    pdb = copy.deepcopy(_get(_render("cpu+scale-out"), "PodDisruptionBudget"))
    resources.append(pdb)  # minAvailable 1 on the single-replica base
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "node drains hang")


def test_reports_ports_that_do_not_line_up() -> None:
    resources = _render("cpu")
    _get(resources, "Service")["spec"]["ports"][1]["targetPort"] = 8080
    _get(resources, "ConfigMap")["data"]["TRANSFER_PORT"] = "50052"
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "port 'metrics' does not reach the container port")
    assert _mentions(problems, "TRANSFER_PORT=50052")


def test_reports_malformed_resource_quantities() -> None:
    resources = _render("gpu")
    limits = _server(resources)["resources"]["limits"]
    limits["memory"] = "lots"
    limits["cpu"] = "1"  # below the request of 2
    problems = vm.check_invariants(resources, expect_gpu=True)
    assert _mentions(problems, "resources.limits.memory='lots' is not a quantity")
    assert _mentions(problems, "resources.requests.cpu exceeds its limit")


def test_reports_a_servicemonitor_that_scrapes_nothing() -> None:
    resources = _render("cpu")
    monitor = _get(resources, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["port"] = "http"
    monitor["spec"]["endpoints"][0]["interval"] = "30 seconds"
    problems = vm.validate_schemas(resources) + vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "not a Prometheus duration")
    assert _mentions(problems, "port 'http' not on transfer-service")


def test_reports_a_dashboard_missing_a_metric(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    dashboard["panels"] = [
        p for p in dashboard["panels"] if "transfer_jobs" not in json.dumps(p.get("targets"))
    ]
    dashboard["panels"][1]["targets"][0]["expr"] += ")"
    path = tmp_path / "grafana-dashboard.json"
    path.write_text(json.dumps(dashboard))
    problems = vm.check_dashboard(path)
    assert _mentions(problems, "no panel charts transfer_jobs")
    assert _mentions(problems, "malformed query")


def test_reports_a_dockerfile_that_disagrees(tmp_path: Path) -> None:
    text = (ROOT / "Dockerfile").read_text()
    broken = text.replace("USER 10001:10001", "USER 0").replace("STOPSIGNAL SIGTERM", "")
    path = tmp_path / "Dockerfile"
    path.write_text(broken)
    problems = vm.check_dockerfile(path, _render("cpu"))
    assert _mentions(problems, "USER must be a numeric non-root uid")
    assert _mentions(problems, "STOPSIGNAL SIGTERM missing")


def test_command_line_fails_on_a_broken_deploy_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    patch_path = deploy / "overlays" / "gpu" / "deployment-patch.yaml"
    patch = yaml.safe_load(patch_path.read_text())
    del patch["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    patch_path.write_text(yaml.safe_dump(patch))
    base = deploy / "base" / "deployment.yaml"
    base.write_text(
        base.read_text().replace(
            "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 10"
        )
    )

    assert vm.main(["--deploy-dir", str(deploy), "--dockerfile", str(ROOT / "Dockerfile")]) == 1
    out = capsys.readouterr().out
    assert "ERROR [gpu]" in out and "nvidia.com/gpu >= 1" in out
    assert "terminationGracePeriodSeconds=10 must exceed" in out


# ----------------------------------------------------------------------- the renderer


def test_strategic_merge_merges_named_lists_and_deletes_nulls() -> None:
    original = {
        "spec": {
            "replicas": 1,
            "containers": [
                {"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["--x"]},
                {"name": "b"},
            ],
        }
    }
    patch = {
        "spec": {
            "replicas": None,
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["--y"]},
                {"name": "c"},
            ],
        }
    }
    merged = vm.strategic_merge(original, patch)
    assert "replicas" not in merged["spec"]
    assert [c["name"] for c in merged["spec"]["containers"]] == ["a", "b", "c"]
    first = merged["spec"]["containers"][0]
    assert first["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    assert first["args"] == ["--y"]  # lists without a merge key are replaced
    assert original["spec"]["replicas"] == 1  # inputs untouched


def test_json6902_operations() -> None:
    doc: Resource = {"spec": {"limits": {"cpu": "1"}, "items": [1, 2]}}
    ops = [
        {"op": "test", "path": "/spec/limits/cpu", "value": "1"},
        {"op": "add", "path": "/spec/limits/nvidia.com~1gpu", "value": 1},
        {"op": "replace", "path": "/spec/items/0", "value": 0},
        {"op": "add", "path": "/spec/items/-", "value": 3},
        {"op": "remove", "path": "/spec/limits/cpu"},
    ]
    assert vm.apply_json6902(doc, ops) == {
        "spec": {"limits": {"nvidia.com/gpu": 1}, "items": [0, 2, 3]}
    }
    with pytest.raises(vm.RenderError):
        vm.apply_json6902(doc, [{"op": "remove", "path": "/spec/missing"}])
    with pytest.raises(vm.RenderError):
        vm.apply_json6902(doc, [{"op": "move", "from": "/spec", "path": "/x"}])


def test_renderer_refuses_what_it_does_not_support(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", deploy)
    kustomization = deploy / "overlays" / "cpu" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "namePrefix: staging-\n")
    with pytest.raises(vm.RenderError, match="unsupported fields"):
        vm.render(deploy / "overlays" / "cpu")


def test_reports_torch_threads_above_the_cpu_limit() -> None:
    resources = _render("cpu")
    _get(resources, "ConfigMap")["data"]["TRANSFER_TORCH_THREADS"] = "16"
    problems = vm.check_invariants(resources, expect_gpu=False)
    assert _mentions(problems, "TRANSFER_TORCH_THREADS=16 exceeds the CPU limit")
