"""`transfer report HEAD`: the per-class table and summary, and with --plots the confusion
matrix and training curves as PNGs (matplotlib, the SDK's `plots` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transfer_client._cli import main

from tests.conftest import RunningServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_report_prints_the_table_and_writes_plots(
    server: RunningServer,
    image_head: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    code = main(["--target", server.address, "report", image_head, "--plots", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "precision" in out and "recall" in out and "support" in out
    assert "macro F1" in out and "ECE" in out and "validation_split" in out
    for name in ("confusion_matrix.png", "training_curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000

    main(["--target", server.address, "--json", "report", image_head])
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == "validation_split" and report["examples"] == 12
