"""The `transfer` command as a shell sees it (issue 19): a closed stdout ends quietly, an
unreachable server's error says how to choose one, the SDK's connection options have flags,
and a refused training example is named by its file."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client._cli import main

from tests.client.conftest import Transfer
from tests.conftest import RunningServer


@pytest.fixture()
def closed_port() -> Iterator[str]:
    """An address on loopback where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"127.0.0.1:{port}"


def _cli(*args: str, stdout: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "transfer_client._cli", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )


def test_a_closed_stdout_ends_without_a_traceback(server: RunningServer, image_head: str) -> None:
    """`transfer --json heads | head -1`: the reader is gone before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails EPIPE
    try:
        result = _cli("--target", server.address, "--json", "heads", stdout=write_end)
    finally:
        os.close(write_end)
    assert result.stderr.decode() == ""
    assert result.returncode == 1


def test_piped_into_head_prints_the_first_line(server: RunningServer, image_head: str) -> None:
    shell = subprocess.run(
        f"set -o pipefail; {sys.executable} -m transfer_client._cli "
        f"--target {server.address} heads | head -1",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shell.stdout.decode().split()[:3] == ["HEAD", "VERSION", "ALIASES"]
    assert b"Traceback" not in shell.stderr and b"Broken pipe" not in shell.stderr


def test_an_unreachable_server_hints_at_target(
    closed_port: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["--target", closed_port, "backbones"]) == 1
    err = capsys.readouterr().err
    assert "(UNAVAILABLE)" in err
    assert f"no server answered at {closed_port}" in err
    assert "--target HOST:PORT" in err and "TRANSFER_TARGET" in err
    assert "Traceback" not in err

    monkeypatch.setenv("TRANSFER_TARGET", closed_port)  # the default target, from the env
    assert main(["jobs"]) == 1
    assert f"no server answered at {closed_port}" in capsys.readouterr().err


def test_connection_options_have_flags(
    closed_port: str, capsys: pytest.CaptureFixture[str], server: RunningServer
) -> None:
    # --wait-for-ready waits for the server (here: until the deadline) instead of failing
    # UNAVAILABLE at once.
    assert main(["--target", closed_port, "--wait-for-ready", "--timeout", "1", "heads"]) == 1
    err = capsys.readouterr().err
    assert "(DEADLINE_EXCEEDED)" in err and "no server answered" not in err

    assert main(["--target", server.address, "--max-attempts", "9", "heads"]) == 1
    assert "max_attempts: 9 is not from 1 to 5" in capsys.readouterr().err
    assert main(["--target", server.address, "heads", "--reattach-seconds", "-1"]) == 1
    assert "reattach_seconds: -1.0 is negative" in capsys.readouterr().err
    assert main(["--target", server.address, "--max-attempts", "1", "heads"]) == 0
    flags = [
        "--max-attempts", "2", "--reattach-seconds", "5", "--stream-idle-seconds", "60",
    ]  # fmt: skip
    assert main(["--target", server.address, *flags, "backbones"]) == 0


def test_a_refused_example_is_named_by_its_file(
    transfer: Transfer, image_folder: Path, tmp_path: Path
) -> None:
    root = tmp_path / "with-a-bad-file"
    for class_dir in sorted(p for p in image_folder.iterdir() if p.is_dir() and p.name[0] != "."):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.glob("*.png")):
            (root / class_dir.name / image.name).write_bytes(image.read_bytes())
    bad = root / "pullover" / "03.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing decodable")

    result = transfer("finetune", "efficientnet_lite0", str(root), "--epochs", "1")
    assert result.code == 1, result.out
    # dress (6 files) sorts first, so pullover/03.png is example 6 + 2 = 8.
    assert "error: examples[8].image: " in result.err and "(INVALID_ARGUMENT)" in result.err
    assert re.search(rf"^  examples\[8\]\.image is {re.escape(str(bad))}$", result.err, re.M)
    assert "Traceback" not in result.err
