"""Fixtures of the `transfer` CLI tests: a runner of `transfer --target <server> ARGS...` and
small image trees, built once per session from Fashion-MNIST."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from transfer_client._cli import main

from tests.conftest import RunningServer

FashionSmall = tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
FASHION_LABELS = ("dress", "pullover", "t-shirt", "trouser")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Transfer = Callable[..., Result]


@pytest.fixture()
def transfer(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> Transfer:
    """Runs `transfer --target <server> --timeout 120 ARGS...` and returns its exit code and
    output. (The generous deadline: the machine running the tests may be busy.)"""

    def run(*args: str) -> Result:
        capsys.readouterr()  # drop whatever came before
        code = main(["--target", server.address, "--timeout", "120", *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory, fashion_small: FashionSmall) -> Path:
    """An ImageFolder tree: one sub-folder of PNG files per class, plus files to be skipped."""
    root = tmp_path_factory.mktemp("images")
    counts: dict[str, int] = {}
    for image, label in fashion_small[0]:
        if counts.get(label, 0) >= 6:
            continue
        counts[label] = counts.get(label, 0) + 1
        (root / label).mkdir(exist_ok=True)
        (root / label / f"{counts[label]:02d}.png").write_bytes(image)
    (root / "dress" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"not read")
    (root / "README.md").write_text("ignored")
    return root


@pytest.fixture(scope="session")
def test_images(
    tmp_path_factory: pytest.TempPathFactory, fashion_small: FashionSmall
) -> list[Path]:
    root = tmp_path_factory.mktemp("to-predict")
    paths = []
    for index, (image, _) in enumerate(fashion_small[1][:2]):
        path = root / f"test-{index}.png"
        path.write_bytes(image)
        paths.append(path)
    return paths
