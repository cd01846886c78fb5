"""The server on the PostgreSQL store (TRANSFER_DATABASE_URL), end to end: a real gRPC server
uploads a dataset, fine-tunes a head and predicts with it; a second server started on the same
database (another store directory: nothing is shared but the database) lists the head, the
job and its events, and predicts the same. A database that cannot be reached at start refuses
the start, saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
from transfer_client import JobCompleted, JobState, TrainingConfig, TransferClient
from transfer_service.app import build_application
from transfer_service.errors import ConfigurationError

from tests.conftest import make_settings, start_server
from tests.datasets import fashion_mnist
from tests.postgres_server import free_port

BACKBONE = "efficientnet_lite0"


def test_a_head_trained_on_one_server_serves_from_another(
    tmp_path: Path, database_url: str
) -> None:
    train = fashion_mnist(8, split="train", seed=1, classes=3)
    test = fashion_mnist(4, split="test", seed=2, classes=3)
    first = start_server(
        make_settings(tmp_path / "first", database_url=database_url, preload_backbones=[BACKBONE])
    )
    try:
        with TransferClient(first.address, timeout=120) as client:
            dataset = client.upload_dataset(train, chunk_size=5)
            done = client.train(
                BACKBONE,
                dataset_id=dataset.dataset_id,
                head_name="fashion",
                config=TrainingConfig(epochs=3, seed=3),
            )
            predicted = [p.label for p in client.predict(done.head_id, [x for x, _ in test])]
            assert {head.head_id for head in client.list_heads()} == {done.head_id}
    finally:
        first.stop()
    # Nothing on the first server's disk: the store lives in the database.
    assert not (tmp_path / "first" / "heads").exists()

    second = start_server(
        make_settings(tmp_path / "second", database_url=database_url, preload_backbones=[BACKBONE])
    )
    try:
        with TransferClient(second.address, timeout=120) as client:
            heads = client.list_heads(backbone=BACKBONE, name="fashion")
            assert [head.head_id for head in heads] == [done.head_id]
            assert set(heads[0].class_names) == {label for _, label in train}
            again = [p.label for p in client.predict(done.head_id, [x for x, _ in test])]
            assert again == predicted
            job = client.get_job(done.job_id)
            assert job.state is JobState.SUCCEEDED and job.head_id == done.head_id
            assert [j.job_id for j in client.list_jobs()] == [done.job_id]
            events = list(client.watch_job(done.job_id))
            assert isinstance(events[-1], JobCompleted)
            assert events[-1].head_id == done.head_id
            client.delete_dataset(dataset.dataset_id)
    finally:
        second.stop()


def test_an_unreachable_database_refuses_the_start(tmp_path: Path) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    settings = make_settings(tmp_path, database_url=url, preload_backbones=[])
    with pytest.raises(ConfigurationError, match=r"TRANSFER_DATABASE_URL: .*unreachable"):
        build_application(settings)
