"""`transfer history`, `transfer plot` and `transfer watch --jsonl` (issue 19) on jobs
trained once for the module on the real server: one with epochs (solver adamw), one
cross-validated (solver lbfgs_cv, one row per C)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from transfer_client import TrainingConfig, TransferClient

from tests.client.conftest import FashionSmall, Transfer
from tests.conftest import RunningServer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trained(server: RunningServer, fashion_small: FashionSmall, config: TrainingConfig) -> str:
    with TransferClient(server.address, timeout=120) as client:
        done = client.train(
            "efficientnet_lite0", fashion_small[0], head_name="cli-history", config=config
        )
    return done.job_id


@pytest.fixture(scope="module")
def epochs_job(server: RunningServer, fashion_small: FashionSmall) -> str:
    return _trained(server, fashion_small, TrainingConfig(solver="adamw", epochs=3, seed=5))


@pytest.fixture(scope="module")
def cv_job(server: RunningServer, fashion_small: FashionSmall) -> str:
    return _trained(server, fashion_small, TrainingConfig(solver="lbfgs_cv", seed=5))


def test_history_of_epochs_as_table_csv_jsonl_and_json(transfer: Transfer, epochs_job: str) -> None:
    table = transfer("history", epochs_job)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "EPOCH", "TRAIN", "LOSS", "TRAIN", "ACC", "VAL", "LOSS", "VAL", "ACC", "LR", "ELAPSED",
    ]  # fmt: skip
    rows = lines[1:4]
    assert [row.split()[-7] if row.startswith("*") else row.split()[0] for row in rows] == [
        "1", "2", "3",
    ]  # fmt: skip
    assert sum(row.startswith("*") for row in rows) == 1
    [kept] = [row for row in rows if row.startswith("*")]
    assert lines[4].startswith(f"job {epochs_job}: completed, head cli-history-")
    assert f"kept: epoch {kept.split()[1]} (val acc " in lines[4]

    as_csv = transfer("history", epochs_job, "--csv")
    assert as_csv.code == 0, as_csv.err
    csv_rows = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert [row["epoch"] for row in csv_rows] == ["1", "2", "3"]
    assert all(row["regularization_c"] == "" for row in csv_rows)
    assert all(0 < float(row["train_loss"]) < 10 for row in csv_rows)
    assert all(0 <= float(row["validation_accuracy"]) <= 1 for row in csv_rows)

    as_jsonl = transfer("history", epochs_job, "--jsonl")
    assert as_jsonl.code == 0, as_jsonl.err
    jsonl_rows = [json.loads(line) for line in as_jsonl.out.splitlines()]
    assert len(jsonl_rows) == 3
    for from_csv, from_jsonl in zip(csv_rows, jsonl_rows, strict=True):
        assert float(from_csv["train_loss"]) == pytest.approx(from_jsonl["train_loss"])
        assert from_jsonl["regularization_c"] is None

    as_json = json.loads(transfer("--json", "history", epochs_job).out)
    assert as_json["kind"] == "epochs" and len(as_json["rows"]) == 3
    assert as_json["best"]["epoch"] == int(kept.split()[1])

    # Two output formats at once is a usage error (argparse exits 2).
    with pytest.raises(SystemExit) as usage:
        transfer("history", epochs_job, "--csv", "--jsonl")
    assert usage.value.code == 2


def test_history_of_a_cross_validated_job_has_one_row_per_c(
    transfer: Transfer, cv_job: str
) -> None:
    table = transfer("history", cv_job)
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split()[:3] == ["C", "TRIED", "C"]
    assert "LR" not in lines[0].split()
    rows = [line for line in lines[1:] if not line.startswith("job ")]
    assert len(rows) >= 3
    assert sum(row.startswith("*") for row in rows) == 1
    assert "; kept: C " in lines[-1]

    csv_rows = list(csv.DictReader(io.StringIO(transfer("history", cv_job, "--csv").out)))
    assert len(csv_rows) == len(rows)
    assert all(float(row["regularization_c"]) > 0 for row in csv_rows)


def test_watch_jsonl_streams_every_event(transfer: Transfer, epochs_job: str) -> None:
    watched = transfer("watch", epochs_job, "--jsonl")
    assert watched.code == 0, watched.err
    events = [json.loads(line) for line in watched.out.splitlines()]
    kinds = [event["event"] for event in events]
    assert kinds[0] == "queued" and kinds[1] == "started" and kinds[-1] == "completed"
    assert kinds.count("completed") == 1
    sequences = [event["sequence"] for event in events]
    assert sequences == sorted(set(sequences))  # every event once, in order
    epoch_ends = [e for e in events if e["event"] == "progress" and e["progress"]["epoch_end"]]
    assert [e["progress"]["epoch"] for e in epoch_ends] == [1, 2, 3]
    assert events[-1]["head_id"].startswith("cli-history-")

    # After a sequence number: only the events after it.
    later = transfer("watch", epochs_job, "--jsonl", "--after-sequence", str(sequences[-2]))
    assert [json.loads(line)["sequence"] for line in later.out.splitlines()] == sequences[-1:]


def test_plot_writes_curves_per_epoch_and_per_c(
    transfer: Transfer, epochs_job: str, cv_job: str, tmp_path: Path
) -> None:
    for job in (epochs_job, cv_job):
        path = tmp_path / f"{job}.png"
        plotted = transfer("plot", job, str(path))
        assert plotted.code == 0, plotted.err
        assert plotted.out.strip() == f"wrote {path}"
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_plot_without_matplotlib_says_how_to_install_it(
    transfer: Transfer, epochs_job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with pytest.raises(SystemExit) as missing:
        transfer("plot", epochs_job, str(tmp_path / "out.png"))
    assert "pip install 'transfer-client[plots]'" in str(missing.value.code)
    assert not (tmp_path / "out.png").exists()


def test_history_of_an_unknown_job_exits_1(transfer: Transfer) -> None:
    result = transfer("history", "job-0000")
    assert result.code == 1 and "(NOT_FOUND)" in result.err
