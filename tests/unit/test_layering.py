"""The server's layering, read from its imports (ast, nothing imported): each part of
`transfer_service` may import only the parts below it, only the edge and the composition root
touch gRPC, protobuf or the generated code, and only the composition root picks a concrete
store. docs/design.md's folder map says the same in prose."""

from __future__ import annotations

import ast
from pathlib import Path

import transfer_service

PACKAGE_DIR = Path(transfer_service.__file__).parent
PACKAGE = "transfer_service"

# The abstract store: what the domain may know of storage.
STORE_CONTRACT = {"store.interface", "store.ids"}
CORE = {"domain", "errors"}
# Module or folder (relative to the package) -> what it may import from the package. The
# most specific key wins; a module not listed here fails the test, so a new room needs a
# line. Entries are prefixes: "store" allows every module of store/.
ALLOWED: dict[str, set[str]] = {
    "domain": set(),
    "errors": set(),
    "settings": set(),
    "request_scope": set(),
    "metrics": set(),
    "torch_threads": set(),
    "structured_logs": {"request_scope", ""},  # "" is the package itself
    # torch_threads and the store contract: the measured precision (issue 20) times on the
    # Predict thread count and keeps its choice in the store.
    "backbones": CORE | {"backbones", "torch_threads"} | STORE_CONTRACT,
    "heads": CORE | {"backbones"},
    "store": CORE | {"store"},
    "predict": CORE | {"backbones", "heads", "predict", "torch_threads"},
    "evaluation": CORE,
    "training": CORE
    | {"backbones", "heads", "training", "torch_threads", "evaluation"}
    | STORE_CONTRACT,
    "dataset_upload": CORE | {"backbones", "training.validation"} | STORE_CONTRACT,
    "list_pages": CORE | STORE_CONTRACT,
    "head_names": CORE | {"store.ids"},
    "head_catalog": CORE | {"backbones", "heads", "head_names", "list_pages"} | STORE_CONTRACT,
    "operations": CORE
    | {"backbones", "heads", "predict", "training", "dataset_upload", "list_pages"}
    | {"head_catalog"}
    | STORE_CONTRACT,
    "head_evaluation": CORE
    | {"backbones", "heads", "predict", "training", "evaluation", "head_catalog"}
    | STORE_CONTRACT,
    "onnx_export": CORE | {"backbones", "heads"},
    "head_operations": CORE
    | {"backbones", "heads", "predict", "onnx_export", "head_catalog"}
    | STORE_CONTRACT,
    "edge": CORE
    | {"edge", "operations", "head_evaluation", "head_operations", "head_catalog"}
    | {"backbones.cache"}
    | {"training.validation", "metrics"}
    | {"request_scope", "settings", ""},
    "app": {"*"},  # the composition root wires everything
    "lifecycle": {"*"},  # the composition root's other half: start, retention, stop
    "__main__": {"app"},
    "": set(),  # the package's __init__
}
# Top-level modules that carry the wire: gRPC, protobuf and the generated stubs (which come
# with the SDK's distribution).
WIRE = {"grpc", "grpc_health", "grpc_reflection", "google", "transfer_client"}
WIRE_ALLOWED = ("edge", "app", "lifecycle")
# torch's training code (optimisers, schedulers), imported or reached as torch.optim.X.
TRAINING_CODE = "torch.optim"
TRAINING_ALLOWED = ("training",)


def module_name(path: Path, package_dir: Path) -> str:
    """'predict.batcher' for predict/batcher.py, 'predict' for predict/__init__.py."""
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names imported by a source file; for `from a import b`, both a and a.b (b may
    be a module). Relative imports are resolved against `package`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                raise AssertionError(f"{path}: relative import; the house style is absolute")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith(TRAINING_CODE + "."):
            found.add(_dotted(node))
    return found


def _dotted(node: ast.expr) -> str:
    """'torch.optim.AdamW' for that attribute chain; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _rule_for(module: str) -> set[str] | None:
    candidates = [key for key in ALLOWED if module == key or module.startswith(key + ".")]
    if not candidates:
        return None
    return ALLOWED[max(candidates, key=len)]


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or (p != "" and name.startswith(p + ".")) for p in prefixes)


def layering_violations(package_dir: Path, package: str = PACKAGE) -> list[str]:
    """One line per import that breaks a rule above."""
    problems: list[str] = []
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        allowed = _rule_for(module)
        if allowed is None:
            problems.append(f"{module}: not in the layering table")
            continue
        for name in sorted(imports_of(path, package)):
            top = name.split(".")[0]
            if top in WIRE and not _inside(module, set(WIRE_ALLOWED)):
                problems.append(f"{module} imports {name}: only the edge and app touch the wire")
            if _inside(name, {TRAINING_CODE}) and not _inside(module, set(TRAINING_ALLOWED)):
                problems.append(f"{module} uses {name}: torch's training code stays in training/")
            if top != package:
                continue
            inner = name[len(package) + 1 :] if name != package else ""
            if "*" in allowed or _inside(inner, {module}) or not _is_module(package_dir, inner):
                continue  # itself, or a name (not a module) taken from an allowed module
            if not _inside(inner, allowed):
                problems.append(f"{module} imports {package}.{inner}".rstrip("."))
    return problems


def _is_module(package_dir: Path, inner: str) -> bool:
    if inner == "":
        return True
    path = package_dir.joinpath(*inner.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_the_server_keeps_its_layers() -> None:
    assert layering_violations(PACKAGE_DIR) == []


def test_every_room_is_checked() -> None:
    """The scan sees the real package: the edge, the Predict path and the store are there."""
    modules = {module_name(p, PACKAGE_DIR) for p in PACKAGE_DIR.rglob("*.py")}
    assert {"edge.servicer", "predict.batcher", "store.local", "training.trainer"} <= modules


def test_the_folder_map_names_every_module() -> None:
    """docs/design.md's folder map is kept in step: every folder and module is named."""
    design = (PACKAGE_DIR.parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    folder_map = design.split("## Folder map", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(path.relative_to(PACKAGE_DIR))
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and f"`{path.name}`" not in folder_map
        and f"`{path.relative_to(PACKAGE_DIR)}`" not in folder_map
    ]
    folders = {p.parent.name for p in PACKAGE_DIR.rglob("__init__.py") if p.parent != PACKAGE_DIR}
    missing += [f"{name}/" for name in sorted(folders) if f"`{name}/`" not in folder_map]
    assert missing == []


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    package_dir = root / PACKAGE
    for relative, source in {"__init__.py": "", **files}.items():
        path = package_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(package_dir).parents:
            (package_dir / parent / "__init__.py").touch()
        path.write_text(source)
    return package_dir


def test_a_violating_import_fails(tmp_path: Path) -> None:
    package_dir = _fake_package(
        tmp_path,
        {
            "domain.py": "import torch\nfrom transfer_service.store import local\n"
            "step = torch.optim.SGD\n",
            "predict/batcher.py": "import grpc\nfrom transfer_service.training import trainer\n",
            "operations.py": "from transfer_service.store.local import LocalStore\n",
            "training/trainer.py": "import torch.optim\n"
            "from transfer_service.store.interface import Store\n",
            "store/local.py": "from transfer_service.store.ids import check_id\n",
            "store/ids.py": "",
            "store/interface.py": "",
            "edge/servicer.py": "import grpc\nfrom transfer_service.operations import X\n",
            "app.py": "import grpc\nfrom transfer_service.store.local import LocalStore\n",
            "attic.py": "",
        },
    )
    assert sorted(layering_violations(package_dir)) == [
        "attic: not in the layering table",
        "domain imports transfer_service.store",
        "domain imports transfer_service.store.local",
        "domain uses torch.optim.SGD: torch's training code stays in training/",
        "operations imports transfer_service.store.local",
        "predict.batcher imports grpc: only the edge and app touch the wire",
        "predict.batcher imports transfer_service.training",
        "predict.batcher imports transfer_service.training.trainer",
    ]
