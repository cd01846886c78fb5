"""Every script in examples/ runs as a user would run it: a subprocess of this Python, its
target in TRANSFER_TARGET, against the real server on a loopback port, on tiny data. The
dropped connection is a real one: a TCP relay between script and server cuts every open
connection in the middle of the job."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transfer_client import TrainingConfig, TransferClient

from tests.conftest import RunningServer
from tests.datasets import bbc_news, fashion_mnist

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FASHION_CLASSES = {"t-shirt", "trouser", "pullover", "dress"}
NEWS_CLASSES = {"business", "entertainment", "politics", "sports", "tech"}


def run_example(
    script: str, *args: str, target: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env={**os.environ, "TRANSFER_TARGET": target},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folder/CLASS/NN.png, 6 Fashion-MNIST images a class, and predict/CLASS.png, one
    held-out test image a class."""
    root = tmp_path_factory.mktemp("example-images")
    for index, (image, label) in enumerate(fashion_mnist(6, classes=4, seed=1)):
        (root / "folder" / label).mkdir(parents=True, exist_ok=True)
        (root / "folder" / label / f"{index:02d}.png").write_bytes(image)
    (root / "predict").mkdir()
    for image, label in fashion_mnist(1, split="test", classes=4, seed=2):
        (root / "predict" / f"{label}.png").write_bytes(image)
    return root


def test_images_from_folder(server: RunningServer, images: Path, tmp_path: Path) -> None:
    plot = tmp_path / "curves.png"
    ran = run_example(
        "images_from_folder.py", str(images / "folder"), "--epochs", "4",
        "--predict", str(images / "predict"), "--plot", str(plot),
        target=server.address, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "24 images of 4 classes: dress, pullover, t-shirt, trouser"
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert 1 <= len(epochs) <= 4 and epochs[0].startswith("epoch 1/4: loss ")
    result = re.fullmatch(
        r"head (\S+): val acc (\d+\.\d)% \(always answering the commonest class: 25\.0%\), "
        r"best epoch (\d) of (\d)",
        next(line for line in lines if line.startswith("head ")),
    )
    assert result, ran.stdout
    with TransferClient(server.address) as client:
        head = client.get_head(result[1])
    assert head.metrics.validation_accuracy is not None
    assert float(result[2]) == pytest.approx(100 * head.metrics.validation_accuracy, abs=0.05)
    assert int(result[3]) == head.metrics.best_epoch and int(result[4]) == len(epochs)
    predicted = {
        match[1]: match[2]
        for line in lines
        if (match := re.fullmatch(r"(\S+)\.png: (\S+) \(\S+ \d+%, \S+ \d+%\)", line))
    }
    assert predicted.keys() == FASHION_CLASSES and set(predicted.values()) <= FASHION_CLASSES
    assert lines[-1] == f"wrote {plot}"
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_text_from_csv(server: RunningServer, tmp_path: Path) -> None:
    data = tmp_path / "news.csv"
    with data.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])  # BBC articles: commas, quotes, newlines
        writer.writerows(bbc_news(6, seed=1))
    ran = run_example(
        "text_from_csv.py", str(data), "--predict",
        "The central bank raised interest rates and shares fell",
        "The striker scored twice and the club won the cup final",
        target=server.address, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0] == "30 texts of 5 classes"
    assert re.fullmatch(
        r"head \S+: cross-validated accuracy \d+\.\d% \(majority baseline 20\.0%\), C=\S+",
        lines[1],
    ), lines[1]
    labels = [re.fullmatch(r"'.*': (\S+) \(.*\)", line)[1] for line in lines[2:]]  # type: ignore[index]
    assert len(labels) == 2 and set(labels) <= NEWS_CLASSES
    # Plain news text on a 30-document head: these two are not hard.
    assert labels == ["business", "sports"], ran.stdout


def test_async_app(server: RunningServer, image_head: str, images: Path, tmp_path: Path) -> None:
    pictures = sorted((images / "predict").glob("*.png"))
    ran = run_example(
        "async_app.py", image_head, *map(str, pictures), "--requests", "12",
        "--concurrency", "4", target=server.address, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert re.match(r"12 of 12 requests answered in \S+ s \(\d+/s, at most 4 in flight\)", lines[0])
    # The app's answers are the sync client's, image by image.
    with TransferClient(server.address, timeout=60) as client:
        expected = client.predict(image_head, pictures)
    for picture, prediction in zip(pictures, expected, strict=True):
        assert f"{picture.name}: {prediction.label} {prediction.score:.0%}" in lines
    counts = re.fullmatch(r"labels: (\{.*\})", lines[-1])
    assert counts and sum(int(n) for n in re.findall(r": (\d+)", counts[1])) == 12


class Relay:
    """A TCP relay on a loopback port to `upstream`; `cut()` closes every connection open
    through it (both ends), as a network failure would; new ones are relayed as before."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._open += [downstream, upstream]
                self.connections += 1
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        with self._lock:
            cut, self._open = self._open, []
        for end in cut:
            with contextlib.suppress(OSError):  # already closed
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()
        self.cut()


@pytest.fixture()
def relay(server: RunningServer) -> Iterator[Relay]:
    relaying = Relay(server.address)
    yield relaying
    relaying.close()


def test_dropped_connection_reattaches_without_losing_or_repeating_an_event(
    relay: Relay, images: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "two-classes"
    for label in ("dress", "trouser"):
        (folder / label).mkdir(parents=True)
        for picture in sorted((images / "folder" / label).glob("*.png"))[:3]:
            (folder / label / picture.name).write_bytes(picture.read_bytes())
    script = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "dropped_connection.py"), str(folder), "--epochs", "6"],
        env={**os.environ, "TRANSFER_TARGET": relay.address},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert script.stdout is not None
    before_cut: list[str] = []
    connections_at_cut = 0
    for line in script.stdout:  # until the first epoch ends: the job is well under way
        before_cut.append(line.rstrip("\n"))
        if re.fullmatch(r"#\d+ training epoch 1/6", before_cut[-1]):
            connections_at_cut = relay.connections
            relay.cut()
            break
    out, err = script.communicate(timeout=120)
    assert script.returncode == 0, f"{before_cut}\n{out}\n{err}"
    after_cut = out.splitlines()
    assert re.fullmatch(r"#\d+ training epoch 1/6", before_cut[-1]), before_cut
    # The stream was re-attached over a new connection.
    assert connections_at_cut >= 1 and relay.connections > connections_at_cut
    # The job went on on the server; the script saw the rest of its epochs, none twice.
    assert [line for line in after_cut if " training epoch " in line][-1].endswith("epoch 6/6")
    assert re.fullmatch(
        r"completed: head \S+, val acc \d+\.\d%; events #1\.\.#\d+, each event once, in order",
        after_cut[-1],
    ), after_cut


def test_dropped_connection_gives_up_with_the_way_to_resume(
    server: RunningServer, images: Path, tmp_path: Path
) -> None:
    # Nothing listens on the port: the script gives up after --reattach-seconds.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{unused.getsockname()[1]}"
    started = time.monotonic()
    ran = run_example(
        "dropped_connection.py", str(images / "folder"), "--timeout", "2",
        "--reattach-seconds", "2", target=nowhere, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert ran.stderr.startswith("server unavailable: "), ran.stderr
    assert time.monotonic() - started < 30

    # --resume follows a job on from the last event seen, as the message says.
    with TransferClient(server.address, timeout=60) as client:
        events = client.fine_tune(
            "efficientnet_lite0",
            fashion_mnist(3, classes=2, seed=5),
            config=TrainingConfig(epochs=3, solver="adamw", early_stopping_patience=0),
        )
        first, second = next(events), next(events)
        events.close()  # detaches; the job goes on
    ran = run_example(
        "dropped_connection.py", "--resume", first.job_id, "--after", str(second.sequence),
        target=server.address, cwd=tmp_path,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert lines[0].startswith(f"#{second.sequence + 1} ")
    assert re.fullmatch(
        rf"completed: head \S+, val acc \d+\.\d%; events #{second.sequence + 1}\.\.#\d+, "
        r"each event once, in order",
        lines[-1],
    ), lines
