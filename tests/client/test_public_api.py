"""`transfer_client.__all__` is the SDK's API: sorted, complete, and nothing private in it."""

from __future__ import annotations

import ast
import inspect
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType

import transfer_client
from transfer_client import errors, types

# The submodules a user may import; every other one is private (its name starts with `_`).
PUBLIC_MODULES = {"errors", "types", "proto"}
# Public modules whose every public name is part of the package's API (`proto` is generated
# code, reached as `transfer_client.proto`, never re-exported).
RE_EXPORTED_MODULES = (errors, types)


def _sort_key(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 keeps `__all__` in: CONSTANTS, then Classes, then the rest."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def defined_names(source: str) -> set[str]:
    """The public names a module's top level defines (classes, functions, assignments), not
    the ones it imports."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def export_problems(
    exported: Sequence[str], namespace: Mapping[str, object], required: Iterable[str]
) -> list[str]:
    """What is wrong with `exported` (an `__all__`) for a package whose attributes are
    `namespace` and whose public modules define the `required` names."""
    problems = []
    if list(exported) != sorted(exported, key=_sort_key):
        problems.append("__all__ is not sorted")
    for name in sorted(set(exported)):
        if list(exported).count(name) > 1:
            problems.append(f"{name} is in __all__ twice")
    for name in exported:
        if name.startswith("_"):
            problems.append(f"{name} is private")
        elif name not in namespace:
            problems.append(f"{name} is in __all__ but not defined")
    public = {
        name
        for name, value in namespace.items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    for name in sorted((public | set(required)) - set(exported)):
        problems.append(f"{name} is public but not in __all__")
    return problems


def module_problems(submodules: Iterable[str]) -> list[str]:
    """The submodules that are neither meant as API nor marked private."""
    return [
        f"module {name} should be private (_{name}) or listed as public"
        for name in sorted(submodules)
        if not name.startswith("_") and name not in PUBLIC_MODULES
    ]


def _required_names() -> set[str]:
    return set().union(*(defined_names(inspect.getsource(m)) for m in RE_EXPORTED_MODULES))


def test_all_is_sorted_complete_and_public() -> None:
    assert export_problems(transfer_client.__all__, vars(transfer_client), _required_names()) == []


def test_the_api_covers_the_clients_errors_and_types() -> None:
    required = _required_names()
    assert {"TransferError", "from_rpc_error", "NotFoundError"} <= required
    assert {"TrainingConfig", "InputData", "FineTuneEvent", "JobState"} <= required
    assert "annotations" not in required and "grpc" not in required  # imports are not API
    assert {"TransferClient", "AsyncTransferClient", "tls_credentials"} <= set(
        transfer_client.__all__
    )


def test_modules_not_meant_as_api_are_private() -> None:
    submodules = [info.name for info in pkgutil.iter_modules(transfer_client.__path__)]
    assert {"_sync", "_aio", "_core", "errors", "types", "proto"} <= set(submodules)
    assert module_problems(submodules) == []


# --- the checks can fail ---------------------------------------------------------------------


def test_defined_names_skips_imports_and_private_names() -> None:
    source = (
        "from __future__ import annotations\n"
        "import grpc\n"
        "from x import Imported\n"
        "Alias: TypeAlias = int\n"
        "LIMIT = 3\n"
        "_hidden = 4\n"
        "class Thing: ...\n"
        "class _Private: ...\n"
        "def helper() -> None: ...\n"
        "async def ahelper() -> None: ...\n"
    )
    assert defined_names(source) == {"Alias", "LIMIT", "Thing", "helper", "ahelper"}


def test_export_problems_finds_each_fault() -> None:
    fake = ModuleType("fake")
    fake.Client = object  # type: ignore[attr-defined]
    fake.Error = Exception  # type: ignore[attr-defined]
    fake.helper = len  # type: ignore[attr-defined]
    fake._private = 1  # type: ignore[attr-defined]
    fake.errors = ModuleType("fake.errors")  # type: ignore[attr-defined]
    namespace = vars(fake)

    assert export_problems(["Client", "Error", "helper"], namespace, ["Error"]) == []
    assert export_problems(["Error", "Client", "helper"], namespace, []) == [
        "__all__ is not sorted"
    ]
    assert export_problems(["helper", "Client", "Error"], namespace, []) == [
        "__all__ is not sorted"
    ]
    assert export_problems(["Client", "helper"], namespace, []) == [
        "Error is public but not in __all__"
    ]
    assert export_problems(["Client", "Error", "helper"], namespace, ["Missing"]) == [
        "Missing is public but not in __all__"
    ]
    assert export_problems(["Client", "Error", "Ghost", "helper"], namespace, []) == [
        "Ghost is in __all__ but not defined"
    ]
    assert export_problems(["Client", "Error", "_private", "helper"], namespace, []) == [
        "_private is private"
    ]
    assert export_problems(["Client", "Client", "Error", "helper"], namespace, []) == [
        "Client is in __all__ twice"
    ]


def test_module_problems_finds_a_public_internal_module() -> None:
    assert module_problems(["errors", "types", "proto", "_sync", "_cli"]) == []
    assert module_problems(["errors", "sync", "_aio"]) == [
        "module sync should be private (_sync) or listed as public"
    ]
