"""Shared fixtures: a real server (real backbones, real gRPC on a loopback port) running on
its own event loop in a background thread, so sync and async clients can both call it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import pytest
from transfer_client import TrainingConfig, TransferClient
from transfer_service.app import build_application
from transfer_service.lifecycle import Application
from transfer_service.settings import Settings

from tests.datasets import bbc_news, fashion_mnist

# Small images keep the suite fast on 2 CPUs; transfer still works at this size.
TEST_IMAGE_SIZE = 64


@dataclass
class RunningServer:
    app: Application
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def call(self, coroutine: object) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.call(self.app.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


def start_server(settings: Settings) -> RunningServer:
    """Builds and starts the application exactly as `python -m transfer_service` does, on a
    thread."""
    loop = asyncio.new_event_loop()
    ready: Future[Application] = Future()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                app = build_application(settings)
                await app.start()
                ready.set_result(app)
            except BaseException as exc:  # surface start-up failures to the test
                ready.set_exception(exc)

        boot_task = loop.create_task(boot())
        loop.run_forever()
        del boot_task

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    app = ready.result(timeout=300)
    return RunningServer(app, loop, thread)


def make_settings(store_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "port": 0,
        "metrics_port": 0,
        "store_dir": store_dir,
        "image_size": TEST_IMAGE_SIZE,
        "weights_dir": store_dir / "no-weights",
        # Measured precision (auto) may pick bf16: tests comparing paths want exact fp32,
        # and a measurement at every server start would cost seconds.
        "precision": "fp32",
        # No background compile (TRANSFER_COMPILE=auto): it would eat CI's 2 cores.
        "compile": "false",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(make_settings(tmp_path_factory.mktemp("store")))
    yield running
    running.stop()


@pytest.fixture()
def client(server: RunningServer) -> Iterator[TransferClient]:
    with TransferClient(server.address, timeout=120) as transfer_client:
        yield transfer_client


@pytest.fixture(scope="session")
def fashion_small() -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
    """4 Fashion-MNIST classes: 15 train and 10 held-out test images per class."""
    return (
        fashion_mnist(15, split="train", seed=1, classes=4),
        fashion_mnist(10, split="test", seed=2, classes=4),
    )


@pytest.fixture(scope="session")
def image_head(
    server: RunningServer, fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]
) -> str:
    """A linear-probe head on efficientnet_lite0, trained once for the session."""
    with TransferClient(server.address, timeout=120) as transfer_client:
        done = transfer_client.train(
            "efficientnet_lite0",
            fashion_small[0],
            head_name="fashion",
            config=TrainingConfig(epochs=15, seed=3),
        )
    return done.head_id


@pytest.fixture(scope="session")
def text_small() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """BBC News, 5 classes: 8 train and 6 held-out documents per class."""
    return bbc_news(8, seed=1), bbc_news(6, seed=1, skip=8)


@pytest.fixture(scope="session")
def text_head(
    server: RunningServer, text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]]
) -> str:
    with TransferClient(server.address, timeout=120) as transfer_client:
        done = transfer_client.train(
            "minilm_l6", text_small[0], head_name="news", config=TrainingConfig()
        )
    return done.head_id


# ---- PostgreSQL (the shared store): a throwaway server for the session ----


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A real PostgreSQL (tests/postgres_server.py), started once per session. Fails, saying
    to run `make testdata`, where PostgreSQL is not installed: never skipped."""
    from tests.postgres_server import PostgresServer

    running = PostgresServer().start()
    yield running
    running.stop()


@pytest.fixture()
def database_url(postgres_server: object) -> str:
    """The URL of a new, empty database of its own for each test."""
    from tests.postgres_server import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    return postgres_server.create_database()
