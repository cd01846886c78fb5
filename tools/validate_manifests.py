"""Render the kustomize overlays in deploy/ and validate them offline.

    python tools/validate_manifests.py              # all checks; exit 1 on any problem
    python tools/validate_manifests.py --render gpu # print one rendered target as YAML

What it does, for each target (overlays/cpu, overlays/gpu, and overlays/cpu with the
components/scale-out component, which no overlay enables yet):

1. Renders the kustomization with the small renderer below (no kubectl needed). It supports
   exactly what deploy/ uses: `resources` (files and directories), `components`, `patches`
   (strategic merge or JSON 6902, from a file or inline, with an optional exact-match target)
   and `images`. Anything else in a kustomization is an error, never silently ignored.
2. Validates every resource against the Kubernetes OpenAPI schemas, in strict mode (unknown
   fields are errors), for each version in KUBERNETES_VERSIONS. The schemas ship inside the
   `kubernetes-validate` package, used here as a library (`kubernetes_validate.validate`), so
   this works offline. The one custom resource, the Prometheus Operator's ServiceMonitor, has no
   schema there and is checked structurally by `check_servicemonitor`.
3. Checks the invariants the service depends on (`check_invariants`): gRPC probes on the
   gRPC port, terminationGracePeriodSeconds > preStop sleep + TRANSFER_GRACE_SECONDS, ports
   and selectors that line up, the store on a PVC that no two pods write at once, non-root and
   read-only root filesystem, resources, and nvidia.com/gpu exactly where the target wants it.
4. When `kubectl` is on PATH, renders the same target with `kubectl kustomize` and requires
   the same resources (`--no-kubectl` skips this).

It also checks deploy/grafana-dashboard.json (`check_dashboard`) and that the Dockerfile
agrees with the manifests (`check_dockerfile`). Needs PyYAML and kubernetes-validate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
DOCKERFILE = REPO_ROOT / "Dockerfile"

# Oldest supported (native sleep preStop action is on by default from 1.30) and newest known.
KUBERNETES_VERSIONS: tuple[str, ...] = ("1.30.0", "1.37.0")

DEPLOYMENT_NAME = "transfer-service"
GPU_RESOURCE = "nvidia.com/gpu"
# Server defaults (service/settings.py) for settings the manifests may leave out.
DEFAULT_SETTINGS: dict[str, str] = {
    "TRANSFER_HOST": "127.0.0.1",
    "TRANSFER_PORT": "50051",
    "TRANSFER_METRICS_PORT": "9090",
    "TRANSFER_GRACE_SECONDS": "20",
    "TRANSFER_DEVICE": "auto",
    "TRANSFER_TORCH_THREADS": "0",
}
# The startup probe must allow at least this long for the start-up backbones to load.
MIN_STARTUP_SECONDS = 300

# Metrics the dashboard must chart (the server's names, without _bucket/_sum/_count).
DASHBOARD_METRICS: frozenset[str] = frozenset(
    {
        "transfer_rpc_requests_total",
        "transfer_rpc_duration_seconds",
        "transfer_predict_duration_seconds",
        "transfer_predict_batch_size",
        "transfer_training_step_duration_seconds",
        "transfer_jobs",
        "transfer_cache_hits_total",
        "transfer_cache_misses_total",
        "transfer_backbone_resident_bytes",
        # Also on the server's registry (service/metrics.py):
        "transfer_predict_queue_seconds",
        "transfer_predict_compute_seconds",
        "transfer_predict_inputs_total",
        "transfer_jobs_finished_total",
        "transfer_cache_evictions_total",
    }
)

Resource = dict[str, Any]


class RenderError(Exception):
    """The kustomization uses something this renderer does not support, or is broken."""


@dataclass(frozen=True)
class Target:
    """One thing to render and check: an overlay, plus components added on top."""

    name: str
    overlay: str  # relative to the deploy directory
    components: tuple[str, ...] = ()  # relative to the deploy directory
    gpu: bool = False


TARGETS: tuple[Target, ...] = (
    Target("cpu", "overlays/cpu"),
    Target("gpu", "overlays/gpu", gpu=True),
    Target("cpu+scale-out", "overlays/cpu", components=("components/scale-out",)),
)


# --------------------------------------------------------------------------- rendering


def load_yaml_documents(path: Path) -> list[Resource]:
    """All non-empty YAML documents of a file; each must be a mapping."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise RenderError(f"{path}: a document is not a mapping")
    return docs


def resource_id(resource: Mapping[str, Any]) -> str:
    """kind/namespace/name, as used in messages and for duplicate detection."""
    meta = resource.get("metadata") or {}
    namespace = meta.get("namespace") or "-"
    return f"{resource.get('kind')}/{namespace}/{meta.get('name')}"


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


# Strategic-merge list keys for the lists deploy/ patches (the patchMergeKey values of the
# Kubernetes API). Any other list in a patch replaces the original, as for atomic lists.
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


def _merge_key(path: tuple[str, ...], key: str) -> str | None:
    if key == "ports":
        # Container ports merge on containerPort; Service ports on port.
        return "containerPort" if any(p.endswith("ontainers") for p in path) else "port"
    return _MERGE_KEYS.get(key)


def strategic_merge(original: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """A strategic merge patch, limited to what deploy/ needs.

    Maps merge recursively, null deletes a key, lists with a known merge key merge item by
    item (new items appended), other lists are replaced. `$patch`-style directives raise.
    """
    if not isinstance(patch, dict) or not isinstance(original, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(original)
    for key, value in patch.items():
        if key.startswith("$"):
            raise RenderError(f"unsupported strategic-merge directive {key!r} at {path}")
        if value is None:
            result.pop(key, None)
            continue
        merge_key = _merge_key(path, key)
        current = result.get(key)
        if isinstance(value, list) and merge_key and isinstance(current, list):
            result[key] = _merge_list(current, value, merge_key, (*path, key))
        elif isinstance(value, dict) and isinstance(current, dict):
            result[key] = strategic_merge(current, value, (*path, key))
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(
    original: list[Any], patch: list[Any], merge_key: str, path: tuple[str, ...]
) -> list[Any]:
    merged = copy.deepcopy(original)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise RenderError(f"list item without merge key {merge_key!r} at {path}")
        for index, existing in enumerate(merged):
            if isinstance(existing, dict) and existing.get(merge_key) == item[merge_key]:
                merged[index] = strategic_merge(existing, item, path)
                break
        else:
            merged.append(copy.deepcopy(item))
    return merged


def _pointer_tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {pointer!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _list_index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if token == "-" and allow_end:
        return len(container)
    if not token.isdigit():
        raise RenderError(f"bad list index {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise RenderError(f"list index {index} out of range")
    return index


def apply_json6902(document: Resource, operations: Sequence[Mapping[str, Any]]) -> Resource:
    """RFC 6902 add, remove, replace and test (move and copy are not needed here)."""
    result = copy.deepcopy(document)
    for op in operations:
        kind = op.get("op")
        tokens = _pointer_tokens(str(op.get("path", "")))
        if not tokens:
            raise RenderError("JSON patch on the whole document is not supported")
        parent: Any = result
        for token in tokens[:-1]:
            if isinstance(parent, list):
                parent = parent[_list_index(parent, token, allow_end=False)]
            elif isinstance(parent, dict) and token in parent:
                parent = parent[token]
            else:
                raise RenderError(f"JSON patch path {op.get('path')!r} does not exist")
        last = tokens[-1]
        if kind == "test":
            if _pointer_get(parent, last) != op.get("value"):
                raise RenderError(f"JSON patch test failed at {op.get('path')!r}")
        elif kind == "remove":
            _pointer_get(parent, last)  # must exist
            if isinstance(parent, list):
                del parent[_list_index(parent, last, allow_end=False)]
            else:
                del parent[last]
        elif kind in ("add", "replace"):
            if "value" not in op:
                raise RenderError(f"JSON patch {kind} without value")
            value = copy.deepcopy(op["value"])
            if kind == "replace":
                _pointer_get(parent, last)  # must exist
            if isinstance(parent, list):
                index = _list_index(parent, last, allow_end=kind == "add")
                if kind == "add":
                    parent.insert(index, value)
                else:
                    parent[index] = value
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise RenderError(f"JSON patch path {op.get('path')!r} is not a container")
        else:
            raise RenderError(f"unsupported JSON patch op {kind!r}")
    return result


def _pointer_get(parent: Any, token: str) -> Any:
    if isinstance(parent, list):
        return parent[_list_index(parent, token, allow_end=False)]
    if isinstance(parent, dict) and token in parent:
        return parent[token]
    raise RenderError(f"JSON patch path element {token!r} does not exist")


_KUSTOMIZATION_KEYS = frozenset(
    {"apiVersion", "kind", "resources", "components", "patches", "images"}
)
_TARGET_KEYS = frozenset({"group", "version", "kind", "name", "namespace"})


def _load_kustomization(directory: Path) -> Resource:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    docs = load_yaml_documents(path)
    if len(docs) != 1:
        raise RenderError(f"{path}: expected one document")
    kustomization = docs[0]
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(f"{path}: unsupported fields {sorted(unknown)}")
    return kustomization


def _matches(resource: Resource, target: Mapping[str, Any]) -> bool:
    group, version = _group_version(str(resource.get("apiVersion", "")))
    meta = resource.get("metadata") or {}
    wanted = {
        "group": group,
        "version": version,
        "kind": resource.get("kind"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
    }
    return all(wanted[key] == value for key, value in target.items())


def _apply_patch(resources: list[Resource], entry: Mapping[str, Any], base: Path) -> None:
    unknown = set(entry) - {"path", "patch", "target"}
    if unknown or ("path" in entry) == ("patch" in entry):
        raise RenderError(f"{base}: a patch needs exactly one of path/patch, got {dict(entry)}")
    text = (base / entry["path"]).read_text() if "path" in entry else str(entry["patch"])
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    if len(docs) != 1:
        raise RenderError(f"{base}: a patch must hold exactly one document")
    body = docs[0]
    target = entry.get("target")
    if target is not None:
        if not isinstance(target, dict) or set(target) - _TARGET_KEYS:
            raise RenderError(f"{base}: unsupported patch target {target!r}")
    elif isinstance(body, dict):
        group, version = _group_version(str(body.get("apiVersion", "")))
        target = {"group": group, "version": version, "kind": body.get("kind")}
        target["name"] = (body.get("metadata") or {}).get("name")
    else:
        raise RenderError(f"{base}: a JSON 6902 patch needs a target")
    hits = [i for i, resource in enumerate(resources) if _matches(resource, target)]
    if not hits:
        raise RenderError(f"{base}: patch target {target} matches no resource")
    for index in hits:
        if isinstance(body, list):
            resources[index] = apply_json6902(resources[index], body)
        elif isinstance(body, dict):
            patch = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
            if "metadata" in patch:
                patch["metadata"] = {
                    k: v for k, v in patch["metadata"].items() if k not in ("name", "namespace")
                }
            resources[index] = strategic_merge(resources[index], patch)
        else:
            raise RenderError(f"{base}: a patch must be a mapping or a list of operations")


_IMAGE_RE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[^:/@]+))?(?:@(?P<digest>.+))?$")


def _apply_images(resources: list[Resource], images: Sequence[Mapping[str, Any]]) -> None:
    for image in images:
        unknown = set(image) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise RenderError(f"unsupported images fields {sorted(unknown)}")
        for resource in resources:
            pod_spec = _pod_spec(resource)
            if pod_spec is None:
                continue
            for key in ("initContainers", "containers"):
                for container in pod_spec.get(key) or []:
                    match = _IMAGE_RE.match(str(container.get("image", "")))
                    if not match or match["name"] != image["name"]:
                        continue
                    name = str(image.get("newName", match["name"]))
                    if "digest" in image:
                        container["image"] = f"{name}@{image['digest']}"
                        continue
                    tag = image.get("newTag", match["tag"])
                    ref = f"{name}:{tag}" if tag is not None else name
                    digest = match["digest"] if "newTag" not in image else None
                    container["image"] = f"{ref}@{digest}" if digest else ref


def _build(directory: Path, inherited: list[Resource] | None) -> list[Resource]:
    kustomization = _load_kustomization(directory)
    kind = kustomization.get("kind", "Kustomization")
    expected_api = {
        "Kustomization": "kustomize.config.k8s.io/v1beta1",
        "Component": "kustomize.config.k8s.io/v1alpha1",
    }.get(kind)
    if expected_api is None or kustomization.get("apiVersion", expected_api) != expected_api:
        raise RenderError(f"{directory}: unexpected kind/apiVersion {kind}")
    if (kind == "Component") != (inherited is not None):
        raise RenderError(
            f"{directory}: a {kind} used as {'component' if inherited else 'resource'}"
        )
    resources = list(inherited) if inherited is not None else []
    for entry in kustomization.get("resources") or []:
        path = (directory / entry).resolve()
        added = _build(path, None) if path.is_dir() else load_yaml_documents(path)
        for resource in added:
            if any(resource_id(r) == resource_id(resource) for r in resources):
                raise RenderError(f"{directory}: duplicate resource {resource_id(resource)}")
            resources.append(resource)
    for entry in kustomization.get("components") or []:
        resources = _build((directory / entry).resolve(), resources)
    for patch in kustomization.get("patches") or []:
        _apply_patch(resources, patch, directory)
    _apply_images(resources, kustomization.get("images") or [])
    return resources


def render(overlay: Path, components: Sequence[Path] = ()) -> list[Resource]:
    """Render a kustomization directory, then apply extra components on top of it."""
    resources = _build(overlay.resolve(), None)
    for component in components:
        resources = _build(component.resolve(), resources)
    return resources


def render_target(target: Target, deploy_dir: Path = DEPLOY_DIR) -> list[Resource]:
    return render(deploy_dir / target.overlay, [deploy_dir / c for c in target.components])


def kubectl_render(target: Target, deploy_dir: Path = DEPLOY_DIR) -> list[Resource]:
    """Render with `kubectl kustomize` (kustomize refuses absolute paths, hence relpath)."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(deploy_dir / target.overlay)
        if target.components:
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(deploy_dir / target.overlay, tmp)],
                "components": [os.path.relpath(deploy_dir / c, tmp) for c in target.components],
            }
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            directory = tmp
        done = subprocess.run(
            ["kubectl", "kustomize", directory],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


def compare_renders(ours: Sequence[Resource], theirs: Sequence[Resource]) -> list[str]:
    """Differences between two renders, resources matched by kind/namespace/name."""
    mine = {resource_id(r): r for r in ours}
    other = {resource_id(r): r for r in theirs}
    problems = [f"{rid}: missing from this renderer" for rid in sorted(other.keys() - mine)]
    problems += [f"{rid}: not rendered by kubectl" for rid in sorted(mine.keys() - other)]
    for rid in sorted(mine.keys() & other.keys()):
        where = _first_difference(mine[rid], other[rid], "")
        if where is not None:
            problems.append(f"{rid}: renders differ from kubectl at {where or '/'}")
    return problems


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if key not in a or key not in b:
                return f"{path}/{key}"
            found = _first_difference(a[key], b[key], f"{path}/{key}")
            if found is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}/{index}")
            if found is not None:
                return found
        return None
    return None if a == b and type(a) is type(b) else path


# --------------------------------------------------------------------------- schemas


def validate_schemas(
    resources: Iterable[Resource], versions: Sequence[str] = KUBERNETES_VERSIONS
) -> list[str]:
    """Strict OpenAPI validation of built-in kinds with kubernetes-validate (offline)."""
    import kubernetes_validate

    problems: list[str] = []
    for resource in resources:
        if resource.get("kind") == "ServiceMonitor":
            problems += check_servicemonitor(resource)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(str(p) for p in error.path) or "(root)"
                problems.append(
                    f"{resource_id(resource)}: schema {version}: {where}: {error.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{resource_id(resource)}: {error.message}")
    return problems


_DURATION_RE = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")


def check_servicemonitor(resource: Resource) -> list[str]:
    """Structural check of a monitoring.coreos.com/v1 ServiceMonitor (a CRD, no schema)."""
    rid = resource_id(resource)
    problems: list[str] = []
    if resource.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"{rid}: apiVersion must be monitoring.coreos.com/v1")
    unknown = set(resource) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        problems.append(f"{rid}: unknown top-level fields {sorted(unknown)}")
    if not isinstance((resource.get("metadata") or {}).get("name"), str):
        problems.append(f"{rid}: metadata.name missing")
    spec = resource.get("spec")
    if not isinstance(spec, dict):
        return [*problems, f"{rid}: spec missing"]
    labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{rid}: spec.selector.matchLabels must be a non-empty map")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*problems, f"{rid}: spec.endpoints must be a non-empty list"]
    allowed = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}
    for index, endpoint in enumerate(endpoints):
        where = f"{rid}: spec.endpoints[{index}]"
        if not isinstance(endpoint, dict):
            problems.append(f"{where} must be a map")
            continue
        if set(endpoint) - allowed:
            problems.append(f"{where}: unexpected fields {sorted(set(endpoint) - allowed)}")
        if not isinstance(endpoint.get("port"), str):
            problems.append(f"{where}.port must name a Service port")
        if not str(endpoint.get("path", "/metrics")).startswith("/"):
            problems.append(f"{where}.path must start with '/'")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not _DURATION_RE.match(str(endpoint[key])):
                problems.append(f"{where}.{key} is not a Prometheus duration")
    return problems


# --------------------------------------------------------------------------- invariants


def _pod_spec(resource: Mapping[str, Any]) -> dict[str, Any] | None:
    if resource.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return None
    spec: Any = ((resource.get("spec") or {}).get("template") or {}).get("spec")
    return spec if isinstance(spec, dict) else None


def _by_kind(resources: Iterable[Resource], kind: str) -> list[Resource]:
    return [r for r in resources if r.get("kind") == kind]


def _name(resource: Mapping[str, Any]) -> str:
    return str((resource.get("metadata") or {}).get("name"))


def _selector_matches(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _effective_env(container: Mapping[str, Any], resources: Sequence[Resource]) -> dict[str, str]:
    """The container's environment: ConfigMaps from envFrom, then env (which wins)."""
    config_maps = {_name(cm): cm.get("data") or {} for cm in _by_kind(resources, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        if ref is not None and ref.get("name") in config_maps:
            prefix = str(source.get("prefix", ""))
            env.update({prefix + k: str(v) for k, v in config_maps[ref["name"]].items()})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def _number_setting(
    env: Mapping[str, str], key: str, problems: list[str], *, integer: bool = True
) -> float | None:
    raw = env.get(key, DEFAULT_SETTINGS[key])
    try:
        return int(raw) if integer else float(raw)
    except ValueError:
        problems.append(f"{key}={raw!r} is not {'an integer' if integer else 'a number'}")
        return None


_QUANTITY_RE = re.compile(
    r"^(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?P<suffix>[a-zA-Z]*)$"
)
_QUANTITY_SUFFIXES: dict[str, float] = {
    "": 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(value: Any) -> float | None:
    """A Kubernetes resource quantity ("500m", "4Gi", 1) as a number; None if malformed.
    (The OpenAPI schemas accept any string here.)"""
    match = _QUANTITY_RE.match(str(value).strip())
    if match is None or match["suffix"] not in _QUANTITY_SUFFIXES:
        return None
    return float(match["number"]) * _QUANTITY_SUFFIXES[match["suffix"]]


def _quantity_positive(value: Any) -> bool:
    quantity = parse_quantity(value) if value is not None else None
    return quantity is not None and quantity > 0


def check_invariants(resources: Sequence[Resource], *, expect_gpu: bool) -> list[str]:
    """What the service needs from its manifests, beyond schema validity."""
    deployments = [d for d in _by_kind(resources, "Deployment") if _name(d) == DEPLOYMENT_NAME]
    if len(deployments) != 1:
        return [f"expected one Deployment {DEPLOYMENT_NAME!r}, found {len(deployments)}"]
    deployment = deployments[0]
    did = resource_id(deployment)
    pod = _pod_spec(deployment) or {}
    pod_labels = ((deployment["spec"].get("template") or {}).get("metadata") or {}).get(
        "labels"
    ) or {}
    problems: list[str] = []

    servers = [
        c
        for c in pod.get("containers") or []
        if any(p.get("name") == "grpc" for p in c.get("ports") or [])
    ]
    if len(servers) != 1:
        return [f"{did}: expected one container with a port named 'grpc'"]
    server = servers[0]
    ports = {p.get("name"): p.get("containerPort") for p in server.get("ports") or []}
    env = _effective_env(server, resources)

    # Config references resolve.
    config_names = {_name(cm) for cm in _by_kind(resources, "ConfigMap")}
    for source in server.get("envFrom") or []:
        ref = source.get("configMapRef") or {}
        if ref and ref.get("name") not in config_names and not ref.get("optional"):
            problems.append(f"{did}: envFrom ConfigMap {ref.get('name')!r} is not in the render")

    # Ports: settings, container ports and probes agree.
    grpc_port = _number_setting(env, "TRANSFER_PORT", problems)
    metrics_port = _number_setting(env, "TRANSFER_METRICS_PORT", problems)
    if grpc_port is not None and ports.get("grpc") != grpc_port:
        problems.append(f"{did}: port 'grpc' is {ports.get('grpc')}, TRANSFER_PORT={grpc_port}")
    if metrics_port is not None and ports.get("metrics") != metrics_port:
        problems.append(
            f"{did}: port 'metrics' is {ports.get('metrics')}, TRANSFER_METRICS_PORT={metrics_port}"
        )
    host = env.get("TRANSFER_HOST", DEFAULT_SETTINGS["TRANSFER_HOST"])
    if host not in ("0.0.0.0", "::", "[::]"):
        problems.append(f"{did}: TRANSFER_HOST={host!r}: probes and Services cannot reach it")

    # Probes: native gRPC, on the gRPC port, and a startup budget for loading backbones.
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server.get(probe_name)
        if not isinstance(probe, dict):
            problems.append(f"{did}: {probe_name} missing")
            continue
        other = {"httpGet", "tcpSocket", "exec"} & set(probe)
        grpc = probe.get("grpc")
        if other or not isinstance(grpc, dict):
            problems.append(f"{did}: {probe_name} must be a gRPC probe, not {sorted(other)}")
        elif grpc.get("port") != ports.get("grpc"):
            problems.append(
                f"{did}: {probe_name} probes port {grpc.get('port')}, "
                f"the gRPC port is {ports.get('grpc')}"
            )
    startup = server.get("startupProbe")
    if isinstance(startup, dict):
        budget = int(startup.get("failureThreshold", 3)) * int(startup.get("periodSeconds", 10))
        if budget < MIN_STARTUP_SECONDS:
            problems.append(
                f"{did}: startupProbe allows {budget} s, under {MIN_STARTUP_SECONDS} s "
                "for loading backbones"
            )

    # Graceful stop fits the grace period: preStop sleep + server drain < SIGKILL.
    grace = _number_setting(env, "TRANSFER_GRACE_SECONDS", problems, integer=False)
    period = int(pod.get("terminationGracePeriodSeconds", 30))
    pre_stop = ((server.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    sleep = int(pre_stop.get("seconds", 0))
    if grace is not None and period <= sleep + grace:
        problems.append(
            f"{did}: terminationGracePeriodSeconds={period} must exceed preStop sleep "
            f"{sleep} s + TRANSFER_GRACE_SECONDS={grace:g}"
        )

    # Service links would inject <SERVICE>_PORT=tcp://... into the TRANSFER_ settings.
    if pod.get("enableServiceLinks", True):
        problems.append(f"{did}: enableServiceLinks must be false (TRANSFER_* env collisions)")

    # Security.
    pod_sc = pod.get("securityContext") or {}
    sc = server.get("securityContext") or {}
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
        problems.append(f"{did}: runAsNonRoot must be true")
    if int(sc.get("runAsUser", pod_sc.get("runAsUser", 0))) == 0:
        problems.append(f"{did}: runAsUser must be a non-zero uid")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{did}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{did}: allowPrivilegeEscalation must be false")
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    mounts = {m.get("mountPath"): m.get("name") for m in server.get("volumeMounts") or []}
    for mount_name in mounts.values():
        if mount_name not in volumes:
            problems.append(f"{did}: volumeMount {mount_name!r} has no volume")
    if "emptyDir" not in volumes.get(mounts.get("/tmp"), {}):
        problems.append(f"{did}: /tmp must be an emptyDir (read-only root filesystem)")

    # Resources.
    resources_spec = server.get("resources") or {}
    requests = resources_spec.get("requests") or {}
    limits = resources_spec.get("limits") or {}
    for key in ("cpu", "memory"):
        if key not in requests:
            problems.append(f"{did}: resources.requests.{key} missing")
    if "memory" not in limits:
        problems.append(f"{did}: resources.limits.memory missing")
    for kind, values in (("requests", requests), ("limits", limits)):
        for key, value in values.items():
            if parse_quantity(value) is None:
                problems.append(f"{did}: resources.{kind}.{key}={value!r} is not a quantity")
    for key in requests.keys() & limits.keys():
        request, limit = parse_quantity(requests[key]), parse_quantity(limits[key])
        if request is not None and limit is not None and request > limit:
            problems.append(f"{did}: resources.requests.{key} exceeds its limit")
    threads = _number_setting(env, "TRANSFER_TORCH_THREADS", problems)
    cpu_limit = parse_quantity(limits["cpu"]) if "cpu" in limits else None
    if threads and cpu_limit is not None and threads > max(1.0, cpu_limit):
        problems.append(f"{did}: TRANSFER_TORCH_THREADS={threads:g} exceeds the CPU limit")
    if not server.get("image"):
        problems.append(f"{did}: container image missing")
    gpus = limits.get(GPU_RESOURCE)
    device = env.get("TRANSFER_DEVICE", DEFAULT_SETTINGS["TRANSFER_DEVICE"])
    if expect_gpu:
        if not _quantity_positive(gpus):
            problems.append(f"{did}: GPU target must set resources.limits.{GPU_RESOURCE} >= 1")
        if device != "cuda":
            problems.append(f"{did}: GPU target must set TRANSFER_DEVICE=cuda, not {device!r}")
    else:
        if gpus is not None or GPU_RESOURCE in requests:
            problems.append(f"{did}: CPU target must not request {GPU_RESOURCE}")
        if device == "cuda":
            problems.append(f"{did}: CPU target must not set TRANSFER_DEVICE=cuda")
    if GPU_RESOURCE in requests and str(requests[GPU_RESOURCE]) != str(gpus):
        problems.append(f"{did}: {GPU_RESOURCE} request must equal its limit")

    # The store: durable (a PVC), and never written by two pods at once.
    store_dir = env.get("TRANSFER_STORE_DIR")
    store_volume = volumes.get(mounts.get(store_dir)) if store_dir else None
    claims = {_name(pvc): pvc for pvc in _by_kind(resources, "PersistentVolumeClaim")}
    for volume in volumes.values():
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim is not None and claim not in claims:
            problems.append(f"{did}: PVC {claim!r} is not in the render")
    if store_volume is None or "persistentVolumeClaim" not in store_volume:
        problems.append(f"{did}: TRANSFER_STORE_DIR={store_dir!r} must be mounted from a PVC")
    else:
        claim = claims.get(store_volume["persistentVolumeClaim"].get("claimName"), {})
        modes = set((claim.get("spec") or {}).get("accessModes") or [])
        hpas = [
            h
            for h in _by_kind(resources, "HorizontalPodAutoscaler")
            if (h.get("spec") or {}).get("scaleTargetRef", {}).get("name") == DEPLOYMENT_NAME
        ]
        max_replicas = max(
            [int(deployment["spec"].get("replicas", 1))]
            + [int(h["spec"].get("maxReplicas", 1)) for h in hpas]
        )
        strategy = (deployment["spec"].get("strategy") or {}).get("type", "RollingUpdate")
        if "ReadWriteMany" not in modes and (max_replicas > 1 or strategy != "Recreate"):
            problems.append(
                f"{did}: store PVC is {sorted(modes)} but up to {max_replicas} replica(s) with "
                f"strategy {strategy}: two pods would share it (use replicas 1 + Recreate, or "
                "ReadWriteMany with a store backend for several writers)"
            )

    problems += _check_service_side(resources, server, pod_labels)
    problems += _check_scaling(resources, deployment, pod_labels)
    return problems


def _check_service_side(
    resources: Sequence[Resource], server: Mapping[str, Any], pod_labels: Mapping[str, Any]
) -> list[str]:
    problems: list[str] = []
    container_ports = {p.get("name"): p.get("containerPort") for p in server.get("ports") or []}
    services = _by_kind(resources, "Service")
    if not services:
        return ["no Service in the render"]
    for service in services:
        sid = resource_id(service)
        spec = service.get("spec") or {}
        if not _selector_matches(spec.get("selector") or {}, pod_labels):
            problems.append(f"{sid}: selector does not match the pod labels")
        names = {p.get("name"): p for p in spec.get("ports") or []}
        for wanted in ("grpc", "metrics"):
            port = names.get(wanted)
            if port is None:
                problems.append(f"{sid}: no port named {wanted!r}")
                continue
            target = port.get("targetPort", port.get("port"))
            resolved = container_ports.get(target) if isinstance(target, str) else target
            if resolved != container_ports.get(wanted):
                problems.append(f"{sid}: port {wanted!r} does not reach the container port")
    for monitor in _by_kind(resources, "ServiceMonitor"):
        mid = resource_id(monitor)
        spec = monitor.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        selected = [
            s
            for s in services
            if _selector_matches(selector, (s.get("metadata") or {}).get("labels") or {})
        ]
        if not selected:
            problems.append(f"{mid}: selects no Service")
        for endpoint in spec.get("endpoints") or []:
            for service in selected:
                port_names = {p.get("name") for p in (service.get("spec") or {}).get("ports") or []}
                if endpoint.get("port") not in port_names:
                    problems.append(f"{mid}: port {endpoint.get('port')!r} not on {_name(service)}")
                elif endpoint.get("port") != "metrics":
                    problems.append(f"{mid}: scrapes {endpoint.get('port')!r}, not 'metrics'")
    return problems


def _check_scaling(
    resources: Sequence[Resource], deployment: Resource, pod_labels: Mapping[str, Any]
) -> list[str]:
    problems: list[str] = []
    deployments = {_name(d) for d in _by_kind(resources, "Deployment")}
    hpas = _by_kind(resources, "HorizontalPodAutoscaler")
    for hpa in hpas:
        hid = resource_id(hpa)
        spec = hpa.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            problems.append(f"{hid}: scaleTargetRef does not name a rendered Deployment")
        if int(spec.get("minReplicas", 1)) > int(spec.get("maxReplicas", 0)):
            problems.append(f"{hid}: minReplicas > maxReplicas")
        if "replicas" in deployment["spec"]:
            problems.append(f"{hid}: the Deployment also fixes spec.replicas; the two fight")
    min_replicas = int(deployment["spec"].get("replicas", 1))
    if hpas:
        min_replicas = min(int((h.get("spec") or {}).get("minReplicas", 1)) for h in hpas)
    for pdb in _by_kind(resources, "PodDisruptionBudget"):
        pid = resource_id(pdb)
        spec = pdb.get("spec") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if not _selector_matches(selector, pod_labels):
            problems.append(f"{pid}: selector does not match the pod labels")
        min_available = spec.get("minAvailable")
        if isinstance(min_available, int) and min_available >= min_replicas:
            problems.append(
                f"{pid}: minAvailable={min_available} with {min_replicas} replica(s) blocks "
                "every voluntary eviction (node drains hang)"
            )
        if spec.get("maxUnavailable") in (0, "0%"):
            problems.append(f"{pid}: maxUnavailable=0 blocks every voluntary eviction")
    return problems


# --------------------------------------------------------------------------- dashboard


_METRIC_RE = re.compile(r"\btransfer_[a-z0-9_]+")


def _base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    in_string = False
    for char in expr:
        if char == '"':
            in_string = not in_string
        elif in_string:
            continue
        elif char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and not in_string


def check_dashboard(path: Path) -> list[str]:
    """The Grafana dashboard: valid JSON, one Prometheus datasource variable, all panels on it,
    well-formed queries, every required metric charted, no overlapping panels."""
    try:
        dashboard = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [f"{path.name}: {error}"]
    problems: list[str] = []
    variables = (dashboard.get("templating") or {}).get("list") or []
    datasource_vars = [
        v for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"
    ]
    if len(datasource_vars) != 1:
        problems.append(f"{path.name}: needs one datasource variable of type prometheus")
        return problems
    ref = "${" + str(datasource_vars[0]["name"]) + "}"
    seen_ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    metrics: set[str] = set()
    for panel in dashboard.get("panels") or []:
        title = panel.get("title", "?")
        if panel.get("id") in seen_ids:
            problems.append(f"{path.name}: duplicate panel id {panel.get('id')}")
        seen_ids.add(panel.get("id"))
        grid = panel.get("gridPos") or {}
        x, y, w, h = (int(grid.get(k, -1)) for k in ("x", "y", "w", "h"))
        if min(x, y) < 0 or w <= 0 or h <= 0 or x + w > 24:
            problems.append(f"{path.name}: panel {title!r} has a bad gridPos {grid}")
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            if cell in cells:
                problems.append(f"{path.name}: panel {title!r} overlaps another panel")
                break
            cells.add(cell)
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != ref:
            problems.append(f"{path.name}: panel {title!r} does not use {ref}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{path.name}: panel {title!r} has no queries")
        for target in targets:
            expr = str(target.get("expr", ""))
            if (target.get("datasource") or {}).get("uid") != ref:
                problems.append(f"{path.name}: a query of {title!r} does not use {ref}")
            if not expr.strip() or not _balanced(expr):
                problems.append(f"{path.name}: panel {title!r} has a malformed query {expr!r}")
            metrics |= {_base_metric(m) for m in _METRIC_RE.findall(expr)}
    for missing in sorted(DASHBOARD_METRICS - metrics):
        problems.append(f"{path.name}: no panel charts {missing}")
    return problems


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if logical and line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        logical = ""
    return instructions


def _env_pairs(rest: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in rest.split() if "=" in pair)


def check_dockerfile(path: Path, resources: Sequence[Resource]) -> list[str]:
    """The image agrees with the manifests: uid, ports, weights dir, signals, entry point."""
    problems: list[str] = []
    instructions = _dockerfile_instructions(path.read_text())
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    if len(stages) < 2:
        problems.append("Dockerfile: expected a multi-stage build")
    final = instructions[stages[-1] :] if stages else instructions
    if not final or not final[0][1].startswith("python:3.11-slim"):
        problems.append("Dockerfile: the runtime stage must be FROM python:3.11-slim")
    keywords = {keyword: rest for keyword, rest in final}
    env: dict[str, str] = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(_env_pairs(rest))

    deployment = next(
        (d for d in _by_kind(resources, "Deployment") if _name(d) == DEPLOYMENT_NAME), None
    )
    pod = (_pod_spec(deployment) if deployment else None) or {}
    containers = pod.get("containers") or [{}]
    manifest_env = _effective_env(containers[0], resources)
    uid = str((pod.get("securityContext") or {}).get("runAsUser", ""))
    user = keywords.get("USER", "").split(":")[0]
    if not user.isdigit() or user == "0":
        problems.append("Dockerfile: USER must be a numeric non-root uid (runAsNonRoot)")
    elif uid and user != uid:
        problems.append(f"Dockerfile: USER {user} but the pod runs as {uid}")
    exposed = set(keywords.get("EXPOSE", "").split())
    for key in ("TRANSFER_PORT", "TRANSFER_METRICS_PORT"):
        if env.get(key) not in exposed:
            problems.append(f"Dockerfile: {key}={env.get(key)} is not EXPOSEd")
        if key in manifest_env and env.get(key) != manifest_env[key]:
            problems.append(f"Dockerfile: {key} differs from the ConfigMap")
    for key in ("TRANSFER_HOST", "TRANSFER_STORE_DIR", "TRANSFER_WEIGHTS_DIR", "HF_HUB_OFFLINE"):
        if key not in env:
            problems.append(f"Dockerfile: ENV {key} missing")
        elif key in manifest_env and env[key] != manifest_env[key]:
            problems.append(
                f"Dockerfile: {key}={env[key]} but the ConfigMap has {manifest_env[key]}"
            )
    if keywords.get("STOPSIGNAL") != "SIGTERM":
        problems.append("Dockerfile: STOPSIGNAL SIGTERM missing")
    if "grpc_health" not in keywords.get("HEALTHCHECK", ""):
        problems.append("Dockerfile: HEALTHCHECK must use grpc.health.v1")
    try:
        cmd = json.loads(keywords.get("CMD", "null"))
    except json.JSONDecodeError:
        cmd = None
    if cmd != ["python", "-m", "service"]:
        problems.append('Dockerfile: CMD must be ["python", "-m", "service"] (exec form)')
    return problems


# --------------------------------------------------------------------------- driver


def validate_target(
    target: Target,
    deploy_dir: Path = DEPLOY_DIR,
    *,
    use_kubectl: bool = True,
    versions: Sequence[str] = KUBERNETES_VERSIONS,
) -> list[str]:
    """Every problem with one target, each prefixed with the target's name."""
    try:
        resources = render_target(target, deploy_dir)
    except (RenderError, OSError, yaml.YAMLError) as error:
        return [f"[{target.name}] render: {error}"]
    problems = validate_schemas(resources, versions)
    problems += check_invariants(resources, expect_gpu=target.gpu)
    if use_kubectl and shutil.which("kubectl"):
        try:
            problems += compare_renders(resources, kubectl_render(target, deploy_dir))
        except (RenderError, subprocess.TimeoutExpired) as error:
            problems.append(str(error))
    return [f"[{target.name}] {problem}" for problem in problems]


def validate_all(
    deploy_dir: Path = DEPLOY_DIR,
    dockerfile: Path = DOCKERFILE,
    *,
    use_kubectl: bool = True,
    versions: Sequence[str] = KUBERNETES_VERSIONS,
) -> list[str]:
    problems: list[str] = []
    for target in TARGETS:
        problems += validate_target(target, deploy_dir, use_kubectl=use_kubectl, versions=versions)
    problems += check_dashboard(deploy_dir / "grafana-dashboard.json")
    if dockerfile.is_file():
        try:
            resources = render_target(TARGETS[0], deploy_dir)
        except (RenderError, OSError, yaml.YAMLError):
            resources = []  # already reported above
        problems += check_dockerfile(dockerfile, resources)
    else:
        problems.append(f"{dockerfile}: missing")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render and validate deploy/ offline.")
    parser.add_argument("--deploy-dir", type=Path, default=DEPLOY_DIR)
    parser.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    parser.add_argument("--no-kubectl", action="store_true", help="skip the kubectl comparison")
    parser.add_argument(
        "--kubernetes-version",
        action="append",
        dest="versions",
        help=f"repeatable; default {' and '.join(KUBERNETES_VERSIONS)}",
    )
    parser.add_argument(
        "--render", choices=[t.name for t in TARGETS], help="print one rendered target and exit"
    )
    args = parser.parse_args(argv)

    if args.render:
        target = next(t for t in TARGETS if t.name == args.render)
        print(yaml.safe_dump_all(render_target(target, args.deploy_dir), sort_keys=False), end="")
        return 0
    if not args.no_kubectl and not shutil.which("kubectl"):
        print("note: kubectl not on PATH, skipping the kubectl kustomize comparison")
    problems = validate_all(
        args.deploy_dir,
        args.dockerfile,
        use_kubectl=not args.no_kubectl,
        versions=args.versions or KUBERNETES_VERSIONS,
    )
    for problem in problems:
        print(f"ERROR {problem}")
    names = ", ".join(t.name for t in TARGETS)
    if problems:
        print(f"{len(problems)} problem(s) in deploy/ ({names}), dashboard or Dockerfile")
        return 1
    print(f"deploy/ OK: {names}; dashboard; Dockerfile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
