"""The client SDK stands alone: it imports without torch and never touches the server code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import transfer_client

CLIENT_DIR = Path(transfer_client.__file__).parent
REPO_ROOT = CLIENT_DIR.parents[1]

# `sys.modules[name] = None` makes any later `import name` raise ImportError.
WITHOUT_SERVER_STACK = """
import sys
for name in ("torch", "torchvision", "timm", "transformers", "numpy", "PIL", "transfer_service"):
    sys.modules[name] = None
import transfer_client
from transfer_client import TransferClient, AsyncTransferClient, TrainingConfig, TransferError
import transfer_client._cli
assert transfer_client._cli.main is not None
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transfer_service", "torch"))
assert all(sys.modules[m] is None for m in loaded), loaded
print("ok")
"""


def test_sdk_and_cli_import_without_torch_or_the_service() -> None:
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVER_STACK],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_blocker_works() -> None:
    """The check above can fail: a torch import under the same setup does fail."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif (  # importlib.import_module("transfer_service...") / __import__(...)
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and getattr(node.func, "attr", getattr(node.func, "id", ""))
            in ("import_module", "__import__")
        ):
            modules.add(node.args[0].value)
    return modules


def test_client_sources_never_import_the_service() -> None:
    sources = sorted(CLIENT_DIR.rglob("*.py"))
    assert len(sources) >= 10  # the package's modules and its generated protobuf code
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(
            m
            for m in _imported_modules(path)
            if m == "transfer_service" or m.startswith("transfer_service.")
        )
        for path in sources
    }
    assert {path: mods for path, mods in offenders.items() if mods} == {}
    heavy = ("torch", "torchvision", "timm", "transformers", "numpy", "PIL", "pydantic")
    heavy_imports = {
        str(path.relative_to(REPO_ROOT)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] in heavy
        )
        for path in sources
    }
    assert {path: mods for path, mods in heavy_imports.items() if mods} == {}


def test_the_import_scan_finds_service_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, transfer_service.errors\n"
        "from transfer_service.app import main\n"
        "from . import sibling\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('transfer_service.settings')\n"
    )
    assert _imported_modules(sample) == {
        "os", "importlib",
        "transfer_service.errors", "transfer_service.app", "transfer_service.settings",
    }  # fmt: skip
