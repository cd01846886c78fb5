"""predict_files (issue 19): a folder of images walked in order, a CSV of texts, chunks within
the server's limits, results in input order and equal to one Predict of the same inputs,
progress, and a refused file named. Real server on loopback, real clients."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from transfer_client import (
    AsyncTransferClient,
    InvalidArgumentError,
    Prediction,
    ResourceExhaustedError,
    TransferClient,
)
from transfer_client._predict_files import FileInput, chunks
from transfer_client._predict_files import located as _located
from transfer_client.proto import transfer_service_pb2 as pb

from tests.conftest import RunningServer

Images = tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]


def _folder(root: Path, images: list[bytes]) -> list[Path]:
    """The images in nested folders under several suffixes, with files a walk must skip;
    returns the image files in the order the walk gives them (sorted by path)."""
    suffixes = (".png", ".PNG", ".tif", ".webp")  # the bytes are PNG: the server sniffs them
    expected = []
    for i, data in enumerate(images):
        folder = root / ("b" if i % 2 else "a") / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img-{i:03d}{suffixes[i % len(suffixes)]}"
        path.write_bytes(data)
        expected.append(path)
    (root / "a" / "notes.txt").write_text("not an input")
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.png").write_bytes(images[0])
    (root / "a" / ".hidden.png").write_bytes(images[0])
    return sorted(expected, key=lambda p: p.relative_to(root).parts)


def _same(got: list[Prediction], want: list[Prediction]) -> None:
    assert [p.label for p in got] == [p.label for p in want]
    assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)


def test_a_folder_is_predicted_in_order_in_chunks(
    client: TransferClient, image_head: str, fashion_small: Images, tmp_path: Path
) -> None:
    images = [data for data, _ in fashion_small[1][:13]]
    expected = _folder(tmp_path, images)
    progress: list[tuple[int, int]] = []

    results = list(
        client.predict_files(
            image_head, tmp_path, top_k=2, chunk_size=5, on_progress=lambda *p: progress.append(p)
        )
    )

    assert [key for key, _ in results] == [str(path) for path in expected]
    together = client.predict(image_head, [p.read_bytes() for p in expected], top_k=2)
    _same([prediction for _, prediction in results], together)
    assert all(len(p.top_k) == 2 for _, p in results)
    assert progress == [(0, 13), (5, 13), (10, 13), (13, 13)]


class CountingPredict(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not subscriptable at run time
    """A stand-in Predict on a real gRPC server that records each call's input count and
    request size, and answers each input with its own text (or byte count) as the label:
    the split into calls, as the wire sees it, without a model's cost."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (inputs, request bytes)
        self.heads: list[str] = []  # each call's head reference

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        def predict(request: bytes, context: grpc.ServicerContext) -> bytes:
            message = pb.PredictRequest.FromString(request)
            self.calls.append((len(message.inputs), len(request)))
            self.heads.append(message.head_id)
            labels = [i.text if i.HasField("text") else str(len(i.image)) for i in message.inputs]
            response = pb.PredictResponse(
                head_id="head-7",
                head_version=3,
                predictions=[pb.Prediction(label=label, score=1.0) for label in labels],
            )
            return bytes(response.SerializeToString())

        return grpc.unary_unary_rpc_method_handler(predict)


@pytest.fixture()
def counting() -> Iterator[tuple[str, CountingPredict]]:
    service = CountingPredict()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        handlers=[service],
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],  # as the service's
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", service
    server.stop(grace=None)


def test_more_inputs_than_one_call_takes(
    counting: tuple[str, CountingPredict], tmp_path: Path
) -> None:
    target, service = counting
    texts = [f"text {i}" for i in range(1100)]
    path = tmp_path / "many.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([["text"], *([text] for text in texts)])
    progress: list[tuple[int, int]] = []
    with TransferClient(target, timeout=60) as client:
        results = list(
            client.predict_files(
                "news@production", path, chunk_size=512, on_progress=lambda *p: progress.append(p)
            )
        )
        with pytest.raises(ValueError, match="chunk_size"):
            client.predict_files("news", path, chunk_size=513)
    assert [count for count, _ in service.calls] == [512, 512, 76]  # the server's 512 a call
    assert progress == [(0, 1100), (512, 1100), (1024, 1100), (1100, 1100)]
    assert [(key, p.label) for key, p in results] == [(text, text) for text in texts]
    assert {(p.head_id, p.head_version) for _, p in results} == {("head-7", 3)}
    # The first call resolves the reference; the rest name the head it resolved to, so one
    # version answers the whole file even if the alias moves meanwhile.
    assert service.heads == ["news@production", "head-7", "head-7"]


def test_large_files_go_in_calls_under_the_byte_limit(
    counting: tuple[str, CountingPredict], tmp_path: Path
) -> None:
    target, service = counting
    sizes = [3 * 1024 * 1024 + i for i in range(12)]  # 36 MiB in all, 3 MiB each
    for i, size in enumerate(sizes):
        (tmp_path / f"{i:02d}.png").write_bytes(b"x" * size)
    with TransferClient(target, timeout=60) as client:
        results = list(client.predict_files("head-7", tmp_path))
    assert [p.label for _, p in results] == [str(size) for size in sizes]  # in order
    assert [count for count, _ in service.calls] == [5, 5, 2]
    assert all(size <= 16 * 1024 * 1024 for _, size in service.calls)


def test_a_csv_of_texts_gives_one_prediction_per_row(
    client: TransferClient,
    text_head: str,
    text_small: tuple[list[tuple[str, str]], list[tuple[str, str]]],
    tmp_path: Path,
) -> None:
    texts = [text for text, _ in text_small[1][:7]]
    path = tmp_path / "texts.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text"])
        writer.writerows([[i, text] for i, text in enumerate(texts)])

    results = list(client.predict_files(text_head, path, chunk_size=3))

    assert [key for key, _ in results] == texts
    _same([p for _, p in results], client.predict(text_head, texts))
    with pytest.raises(ValueError, match="'text' column"):
        (tmp_path / "no-text.csv").write_text("label\nx\n")
        client.predict_files(text_head, tmp_path / "no-text.csv")


def test_a_refused_file_is_named(
    client: TransferClient, image_head: str, fashion_small: Images, tmp_path: Path
) -> None:
    for i, (data, _) in enumerate(fashion_small[1][:6]):
        (tmp_path / f"{i}.png").write_bytes(data)
    (tmp_path / "4.png").write_bytes(b"not an image at all")
    with pytest.raises(InvalidArgumentError) as refused:
        list(client.predict_files(image_head, tmp_path, chunk_size=3))
    error = refused.value
    assert error.message.startswith(f"{tmp_path / '4.png'}: not a decodable image")
    # Its position among all the files, not in its call (the second: inputs[1] there).
    assert [v.field for v in error.field_violations] == ["inputs[4]"]


def test_a_list_of_paths_and_a_missing_one(
    client: TransferClient, image_head: str, fashion_small: Images, tmp_path: Path
) -> None:
    paths = []
    for i, (data, _) in enumerate(fashion_small[1][:3]):
        paths.append(tmp_path / f"x{i}.bin")  # named files are taken whatever their suffix
        paths[-1].write_bytes(data)
    results = list(client.predict_files(image_head, [paths[2], paths[0]]))
    assert [key for key, _ in results] == [str(paths[2]), str(paths[0])]
    with pytest.raises(FileNotFoundError):
        client.predict_files(image_head, tmp_path / "missing")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.png").write_bytes(fashion_small[1][0][0])
    with pytest.raises(ValueError, match="no image files"):
        client.predict_files(image_head, tmp_path / "empty")


async def test_the_async_client_gives_the_same(
    server: RunningServer,
    client: TransferClient,
    image_head: str,
    fashion_small: Images,
    tmp_path: Path,
) -> None:
    _folder(tmp_path, [data for data, _ in fashion_small[1][:7]])
    progress: list[tuple[int, int]] = []
    async with AsyncTransferClient(server.address, timeout=120) as aio:
        got = [
            item
            async for item in aio.predict_files(
                image_head, tmp_path, chunk_size=4, on_progress=lambda *p: progress.append(p)
            )
        ]
    want = list(client.predict_files(image_head, tmp_path))
    assert [key for key, _ in got] == [key for key, _ in want]
    _same([p for _, p in got], [p for _, p in want])
    assert progress == [(0, 7), (4, 7), (7, 7)]


@pytest.mark.parametrize(
    ("sizes", "max_inputs", "max_bytes", "expected"),
    [
        ([10] * 7, 3, 1000, [(0, 3), (3, 3), (6, 1)]),
        ([10, 10, 10, 10], 10, 25, [(0, 2), (2, 2)]),
        ([5, 100, 5], 10, 50, [(0, 1), (1, 1), (2, 1)]),  # too big: alone
        ([], 3, 100, []),
    ],
)
def test_chunks_keep_within_both_limits(
    sizes: list[int], max_inputs: int, max_bytes: int, expected: list[tuple[int, int]]
) -> None:
    inputs = [FileInput(str(i), str(i), size) for i, size in enumerate(sizes)]
    got = [(first, len(chunk)) for first, chunk in chunks(inputs, max_inputs, max_bytes)]
    assert got == expected


def test_an_error_without_details_still_names_the_file() -> None:
    chunk = [FileInput(f"dir/{i}.png", Path(f"dir/{i}.png"), 10) for i in range(3)]
    error = ResourceExhaustedError("inputs[1]: image is 9000x9000 pixels, over the limit")
    located = _located(error, chunk, 6)
    assert isinstance(located, ResourceExhaustedError)
    assert located.message == "dir/1.png: image is 9000x9000 pixels, over the limit"
