"""Heads that cannot hurt the service (issue 15): damaged weights fail their checksum instead
of predicting wrongly, damaged metadata never breaks anyone else's listing and stays
deletable (by its owner only), a Predict racing a DeleteHead cannot bring the head back,
and the head cache keeps to its bounds."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import torch
import transfer_service.heads as heads_module
from torch import nn
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.domain import (
    DEFAULT_TENANT,
    HeadRecord,
    Modality,
    TrainingConfig,
    TrainingMetrics,
)
from transfer_service.errors import FailedPreconditionError, NotFoundError, UnreadableHeadError
from transfer_service.heads import HeadCache, LoadedHead, TaskHead, module_bytes
from transfer_service.store.local import LocalStore

from tests.conftest import RunningServer, make_settings, start_server
from tests.reliability.conftest import assert_serving, probe_images

WEIGHTS = {"classifier.weight": torch.randn(2, 3), "classifier.bias": torch.zeros(2)}


def record(head_id: str = "cats-1234", tenant: str = DEFAULT_TENANT) -> HeadRecord:
    return HeadRecord(
        head_id=head_id,
        name="cats",
        backbone="efficientnet_lite0",
        modality=Modality.IMAGE,
        class_names=("cat", "dog"),
        trainable_blocks=0,
        input_size=224,
        hidden_dim=0,
        metrics=TrainingMetrics(0.1, 0.9, 0.2, 0.8, 3, 5, True, 1.5),
        config=TrainingConfig(),
        created_time=datetime.now(UTC),
        size_bytes=24,
        job_id="job-1",
        tenant=tenant,
    )


def flip_data_byte(weights_file: Path, position: int = 0) -> None:
    """Flips one byte in the safetensors data section (after the 8-byte header length and
    the JSON header): the file still parses, one number is different."""
    data = bytearray(weights_file.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    data[8 + header_length + position] ^= 0x40
    weights_file.write_bytes(bytes(data))


def head_json(store_root: Path, head_id: str) -> Path:
    return store_root / "heads" / head_id / "head.json"


# ---- 1. checksums ----


def test_a_flipped_weight_byte_fails_the_checksum(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    flip_data_byte(tmp_path / "heads" / "cats-1234" / "weights.safetensors", 5)
    with pytest.raises(FailedPreconditionError, match=r"fail their checksum.*delete it"):
        store.load_head_weights("cats-1234")


def test_heads_saved_before_checksums_load_unchecked(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record(), WEIGHTS)
    meta = head_json(tmp_path, "cats-1234")
    data = json.loads(meta.read_text())
    del data["weights_sha256"]  # as written before checksums
    meta.write_text(json.dumps(data))
    torch.testing.assert_close(store.load_head_weights("cats-1234"), WEIGHTS)


# ---- 2. damaged metadata ----


def _set(path: str, value: object) -> Callable[[dict[str, object]], object]:
    def change(data: dict[str, object]) -> object:
        target: dict[str, object] = data
        *parents, last = path.split(".")
        for parent in parents:
            target = target[parent]  # type: ignore[assignment]
        target[last] = value
        return data

    return change


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "null": lambda text: b"null",
    "a list": lambda text: b"[1, 2]",
    "a string": lambda text: b'"head"',
    "an empty object": lambda text: b"{}",
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: b"",
    "invalid utf-8": lambda text: text[:10] + b"\xff" + text[11:],
}
FIELD_DAMAGE: dict[str, Callable[[dict[str, object]], object]] = {
    "name a number": _set("name", 5),
    "class_names a string": _set("class_names", "ab"),
    "class_names numbers": _set("class_names", [1, 2]),
    "class_names empty": _set("class_names", []),
    "trainable_blocks a bool": _set("trainable_blocks", True),
    "input_size negative": _set("input_size", -3),
    "bad date": _set("created_time", "yesterday"),
    "date a number": _set("created_time", 12),
    "unknown modality": _set("modality", "smell"),
    "metrics null": _set("metrics", None),
    "metric a string": _set("metrics.train_loss", "low"),
    "config a list": _set("config", [1]),
    "config field unknown": _set("config.colour", "red"),
    "tenant null": _set("tenant", None),
    "format_version a string": _set("format_version", "1"),
    "checksum not hex": _set("weights_sha256", "zz"),
    "another head's id": _set("head_id", "dogs-9999"),
}


def _damage_all() -> Iterator[object]:
    for name, damage in DAMAGE.items():
        yield pytest.param(damage, id=name)
    for name, change in FIELD_DAMAGE.items():

        def apply(text: bytes, change: Callable[[dict[str, object]], object] = change) -> bytes:
            return json.dumps(change(json.loads(text))).encode()

        yield pytest.param(apply, id=name)


@pytest.mark.parametrize("apply", list(_damage_all()))
def test_damaged_metadata_is_failed_precondition_and_left_out_of_listings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, apply: Callable[[bytes], bytes]
) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record("good-1"), WEIGHTS)
    store.save_head(record("bad-1"), WEIGHTS)
    meta = head_json(tmp_path, "bad-1")
    meta.write_bytes(apply(meta.read_bytes()))
    with pytest.raises(UnreadableHeadError, match=r"bad-1.*delete it"):
        store.get_head("bad-1")
    with pytest.raises(FailedPreconditionError):
        store.load_head_weights("bad-1")
    with caplog.at_level(logging.WARNING, logger="transfer_service.store.head_files"):
        assert [head.head_id for head in store.list_heads()] == ["good-1"]
        assert [head.head_id for head in store.list_heads()] == ["good-1"]
    warnings = [r for r in caplog.records if "bad-1" in r.getMessage()]
    assert len(warnings) == 1, "one warning per damaged head, not one per listing"
    store.delete_head("bad-1")
    with pytest.raises(NotFoundError):
        store.get_head("bad-1")


def test_a_naive_creation_time_is_read_as_utc(tmp_path: Path) -> None:
    """One naive time among aware ones would make comparing them (sorting, paging) raise.
    The head index is rebuilt from the files here (a store written before it existed), so
    the naive time is also what orders the listing."""
    store = LocalStore(tmp_path)
    store.save_head(record("aware-1"), WEIGHTS)
    store.save_head(record("naive-1"), WEIGHTS)
    meta = head_json(tmp_path, "naive-1")
    meta.write_text(
        json.dumps(_set("created_time", "2020-01-01T00:00:00")(json.loads(meta.read_text())))
    )
    assert store.get_head("naive-1").created_time == datetime(2020, 1, 1, tzinfo=UTC)
    store.close()
    with sqlite3.connect(tmp_path / "store.sqlite3") as db:
        db.execute("DELETE FROM heads")
    db.close()
    reopened = LocalStore(tmp_path)
    assert [head.head_id for head in reopened.list_heads()] == ["naive-1", "aware-1"]
    after = (datetime(2020, 1, 1, tzinfo=UTC), "naive-1")
    assert [head.head_id for head in reopened.list_heads(after=after)] == ["aware-1"]


def test_an_unreadable_head_still_names_its_owner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.save_head(record("alice-1", tenant="alice"), WEIGHTS)
    head_json(tmp_path, "alice-1").write_text("{trunc")
    with pytest.raises(UnreadableHeadError) as caught:
        store.get_head("alice-1")
    assert caught.value.owner == "alice"
    # A head saved before the tenant file existed: the owner is unknown.
    (tmp_path / "heads" / "alice-1" / "tenant").unlink()
    with pytest.raises(UnreadableHeadError) as caught:
        store.get_head("alice-1")
    assert caught.value.owner is None


# ---- 3 and 4. the head cache: discard during a load, bounds ----


def tiny_head(classes: int, features: int = 8) -> TaskHead:
    return TaskHead([], lambda state: state, nn.Linear(features, classes), features)


def loaded(head_id: str, classes: int = 2) -> LoadedHead:
    return LoadedHead(record(head_id), tiny_head(classes))


class Events:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, event: str, cache: str) -> None:
        assert cache == "head"
        self.seen.append(event)


def test_put_keeps_to_the_entry_bound() -> None:
    events = Events()
    cache = HeadCache(None, None, None, 2, on_event=events)  # type: ignore[arg-type]
    for index in range(20):
        cache.put(loaded(f"head-{index}"))
        assert len(cache) <= 2
    assert cache.peek("head-19") is not None and cache.peek("head-18") is not None
    assert events.seen.count("evict") == 18


def test_get_resident_counts_a_hit_only_for_an_admitted_resident_head() -> None:
    """Predict's warm path: each resolution served from memory is one hit; a head not
    resident counts nothing there (the loading `get` counts its miss), nor does a refused
    one. A hit refreshes the head's LRU place; `peek` neither counts nor refreshes."""
    events = Events()
    cache = HeadCache(None, None, None, 2, on_event=events)  # type: ignore[arg-type]
    cache.put(loaded("old"))
    cache.put(loaded("new"))
    assert cache.get_resident("absent") is None
    assert events.seen == []

    def refuse(head: HeadRecord) -> None:
        raise NotFoundError("not yours")

    with pytest.raises(NotFoundError):
        cache.get_resident("old", refuse)
    assert cache.peek("old") is not None and events.seen == []
    cache.put(loaded("third"))  # neither the refusal nor peek refreshed "old": it goes
    assert cache.peek("old") is None and events.seen == ["evict"]
    hit = cache.get_resident("new")
    assert hit is not None and hit.record.head_id == "new"
    assert events.seen == ["evict", "hit"]
    cache.put(loaded("fourth"))  # evicts "third", now the least recently used
    assert cache.peek("new") is not None and cache.peek("third") is None


def test_put_keeps_to_the_byte_bound() -> None:
    size = module_bytes(tiny_head(4))
    events = Events()
    cache = HeadCache(
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        100,
        on_event=events,
        max_bytes=size * 3 + size // 2,
    )
    for index in range(20):
        cache.put(loaded(f"head-{index}", classes=4))
        assert cache.resident_bytes() <= size * 3 + size // 2
    assert len(cache) == 3 and cache.resident_bytes() == 3 * size
    # A head larger than the whole budget is not kept (and evicts nothing to make room).
    cache.put(loaded("huge", classes=1000))
    assert cache.peek("huge") is None and len(cache) == 3
    assert events.seen.count("evict") == 17 + 1
    # Replacing an entry counts its bytes once.
    cache.put(loaded("head-19", classes=4))
    assert cache.resident_bytes() == 3 * size
    cache.discard("head-19")
    assert cache.resident_bytes() == 2 * size and len(cache) == 2


@pytest.fixture(scope="module")
def stored_head(
    server: RunningServer, image_head: str
) -> tuple[HeadRecord, dict[str, torch.Tensor]]:
    store = server.app.store
    return store.get_head(image_head), store.load_head_weights(image_head)


def test_a_load_racing_a_discard_is_not_cached(
    server: RunningServer, stored_head: tuple[HeadRecord, dict[str, torch.Tensor]]
) -> None:
    """HeadCache.get reads the record and the weights, then caches them. A DeleteHead that
    discards the head in between must not find it back in the cache afterwards."""
    head_record, weights = stored_head
    reading = threading.Event()
    release = threading.Event()

    def load_weights(head_id: str) -> dict[str, torch.Tensor]:
        reading.set()
        assert release.wait(30)
        return weights

    cache = HeadCache(server.app.backbones, lambda head_id: head_record, load_weights, 4)
    results: list[LoadedHead] = []
    loader = threading.Thread(target=lambda: results.append(cache.get(head_record.head_id)))
    loader.start()
    assert reading.wait(30)
    cache.discard(head_record.head_id)  # the delete happens while the weights are read
    release.set()
    loader.join(30)
    assert results, "the racing call is still answered"
    assert cache.peek(head_record.head_id) is None and len(cache) == 0
    # A load that starts after the discard is cached as usual.
    cache.get(head_record.head_id)
    assert cache.peek(head_record.head_id) is not None


def test_two_loads_and_a_discard(
    server: RunningServer, stored_head: tuple[HeadRecord, dict[str, torch.Tensor]]
) -> None:
    """Two loads of one head in flight, then a discard: neither may cache it."""
    head_record, weights = stored_head
    reading = threading.Semaphore(0)
    release = threading.Event()

    def load_weights(head_id: str) -> dict[str, torch.Tensor]:
        reading.release()
        assert release.wait(30)
        return weights

    cache = HeadCache(server.app.backbones, lambda head_id: head_record, load_weights, 4)
    loaders = [threading.Thread(target=cache.get, args=(head_record.head_id,)) for _ in range(2)]
    for loader in loaders:
        loader.start()
    for _ in loaders:
        assert reading.acquire(timeout=30)
    cache.discard(head_record.head_id)
    release.set()
    for loader in loaders:
        loader.join(30)
    assert len(cache) == 0


def test_get_keeps_to_the_bounds_and_serves_a_head_over_the_budget(
    server: RunningServer, stored_head: tuple[HeadRecord, dict[str, torch.Tensor]]
) -> None:
    head_record, weights = stored_head

    def load_record(head_id: str) -> HeadRecord:
        return dataclasses.replace(head_record, head_id=head_id)

    size = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    events = Events()
    cache = HeadCache(
        server.app.backbones,
        load_record,
        lambda head_id: weights,
        2,
        on_event=events,
        max_bytes=10 * size,
    )
    for index in range(5):
        cache.get(f"copy-{index}")
        assert len(cache) <= 2
    assert events.seen.count("evict") == 3
    small = HeadCache(
        server.app.backbones, load_record, lambda head_id: weights, 2, max_bytes=size // 2
    )
    assert small.get("copy-0").record.head_id == "copy-0"  # served ...
    assert len(small) == 0 and small.resident_bytes() == 0  # ... not kept


def test_weights_that_do_not_fit_the_metadata_are_failed_precondition(
    server: RunningServer, stored_head: tuple[HeadRecord, dict[str, torch.Tensor]]
) -> None:
    head_record, weights = stored_head
    wrong = dataclasses.replace(head_record, class_names=(*head_record.class_names, "extra"))
    cache = HeadCache(server.app.backbones, lambda head_id: wrong, lambda head_id: weights, 2)
    with pytest.raises(FailedPreconditionError, match="do not fit its metadata"):
        cache.get(head_record.head_id)


# ---- over gRPC, on the session server ----


def copy_head(
    server: RunningServer,
    stored_head: tuple[HeadRecord, dict[str, torch.Tensor]],
    head_id: str,
    tenant: str = DEFAULT_TENANT,
) -> Path:
    head_record, weights = stored_head
    # version=0: the copy is saved as its name's next version (a version is saved once).
    server.app.store.save_head(
        dataclasses.replace(head_record, head_id=head_id, tenant=tenant, version=0), weights
    )
    return server.app.settings.store_dir / "heads" / head_id


def predict(stub: pb_grpc.TransferServiceStub, head_id: str) -> pb.PredictResponse:
    request = pb.PredictRequest(head_id=head_id, inputs=[pb.Input(image=probe_images(1)[0])])
    response: pb.PredictResponse = stub.Predict(request, timeout=60)
    return response


def code_of(call: Callable[..., object], *args: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    error: grpc.Call = caught.value  # type: ignore[assignment]
    return error.code(), error.details() or ""


def test_predict_on_damaged_weights_is_failed_precondition(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    stored_head: tuple[HeadRecord, dict[str, torch.Tensor]],
    image_head: str,
) -> None:
    directory = copy_head(server, stored_head, "flipped-1")
    # A byte near the end of the last tensor: the file still parses, one number changed.
    weights_file = directory / "weights.safetensors"
    size = weights_file.stat().st_size
    header = int.from_bytes(weights_file.read_bytes()[:8], "little")
    flip_data_byte(weights_file, size - 8 - header - 2)
    code, details = code_of(lambda: predict(stub, "flipped-1"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION, details
    assert "checksum" in details and "flipped-1" in details
    assert_serving(server.address, stub, image_head)
    stub.DeleteHead(pb.DeleteHeadRequest(head_id="flipped-1"), timeout=30)


@pytest.mark.parametrize(
    ("head_id", "content"),
    [("null-1", b"null"), ("truncated-1", b'{"format_version": 1, "head_id": "trunc')],
)
def test_damaged_metadata_over_grpc(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    stored_head: tuple[HeadRecord, dict[str, torch.Tensor]],
    image_head: str,
    head_id: str,
    content: bytes,
) -> None:
    directory = copy_head(server, stored_head, head_id)
    (directory / "head.json").write_bytes(content)
    listed = stub.ListHeads(pb.ListHeadsRequest(), timeout=30)
    ids = {head.head_id for head in listed.heads}
    assert image_head in ids and head_id not in ids
    for call in (
        lambda: stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30),
        lambda: predict(stub, head_id),
    ):
        code, details = code_of(call)
        assert code is grpc.StatusCode.FAILED_PRECONDITION, details
    stub.DeleteHead(pb.DeleteHeadRequest(head_id=head_id), timeout=30)
    code, _ = code_of(lambda: stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30))
    assert code is grpc.StatusCode.NOT_FOUND
    assert_serving(server.address, stub, image_head)


TOKENS = {
    "alice": "alice-5e0c1f2a9b7d4e36",
    "bob": "bob-8a1d3c5e7f9b2d4a",
    DEFAULT_TENANT: "default-4c6e8a0b2d",
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with authentication on (no backbones loaded: only DeleteHead is called)."""
    running = start_server(
        make_settings(
            tmp_path_factory.mktemp("secured"),
            preload_backbones=[],
            auth_tokens=",".join(f"{token}={tenant}" for tenant, token in TOKENS.items()),
        )
    )
    yield running
    running.stop()


def call_as(server: RunningServer, tenant: str, method: str, request: object) -> grpc.StatusCode:
    """The status of one call as `tenant`."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        try:
            getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {TOKENS[tenant]}"),), timeout=30
            )
        except grpc.RpcError as error:
            return error.code()  # type: ignore[attr-defined, no-any-return]
    return grpc.StatusCode.OK


def delete_as(server: RunningServer, tenant: str, head_id: str) -> grpc.StatusCode:
    return call_as(server, tenant, "DeleteHead", pb.DeleteHeadRequest(head_id=head_id))


def get_as(server: RunningServer, tenant: str, head_id: str) -> grpc.StatusCode:
    return call_as(server, tenant, "GetHead", pb.GetHeadRequest(head_id=head_id))


def test_only_the_owner_deletes_a_head_with_unreadable_metadata(
    secured: RunningServer, stored_head: tuple[HeadRecord, dict[str, torch.Tensor]]
) -> None:
    owned = copy_head(secured, stored_head, "owned-1", tenant="alice")
    (owned / "head.json").write_text("{")
    # Damaged, it is FAILED_PRECONDITION to its owner and unknown to everyone else.
    assert get_as(secured, "alice", "owned-1") is grpc.StatusCode.FAILED_PRECONDITION
    assert get_as(secured, "bob", "owned-1") is grpc.StatusCode.NOT_FOUND
    assert delete_as(secured, "bob", "owned-1") is grpc.StatusCode.NOT_FOUND
    assert owned.exists()
    assert delete_as(secured, "alice", "owned-1") is grpc.StatusCode.OK
    assert not owned.exists()
    # Saved before the tenant file existed and damaged since: nobody but the default tenant.
    legacy = copy_head(secured, stored_head, "legacy-1", tenant="alice")
    (legacy / "head.json").write_text("{")
    (legacy / "tenant").unlink()
    for tenant in ("alice", "bob"):
        assert delete_as(secured, tenant, "legacy-1") is grpc.StatusCode.NOT_FOUND
    assert delete_as(secured, DEFAULT_TENANT, "legacy-1") is grpc.StatusCode.OK
    assert not legacy.exists()


def test_a_predict_loading_the_head_during_delete_head_does_not_bring_it_back(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    stored_head: tuple[HeadRecord, dict[str, torch.Tensor]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race made certain: the Predict has read the head and is about to cache it (held
    in module_bytes, which sizes it for the cache) when DeleteHead runs to completion."""
    loading = threading.Event()
    release = threading.Event()
    real_module_bytes = heads_module.module_bytes

    def held_module_bytes(module: nn.Module) -> int:
        loading.set()
        release.wait(30)
        return real_module_bytes(module)

    monkeypatch.setattr(heads_module, "module_bytes", held_module_bytes)
    copy_head(server, stored_head, "held-1")
    racing = threading.Thread(target=_predict_quietly, args=(stub, "held-1"))
    racing.start()
    try:
        assert loading.wait(60), "the Predict never loaded the head"
        stub.DeleteHead(pb.DeleteHeadRequest(head_id="held-1"), timeout=30)
    finally:
        release.set()
        racing.join(60)
    monkeypatch.undo()
    code, details = code_of(predict, stub, "held-1")
    assert code is grpc.StatusCode.NOT_FOUND, f"{code} {details}"


def test_no_predict_succeeds_after_delete_head_returns(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    stored_head: tuple[HeadRecord, dict[str, torch.Tensor]],
) -> None:
    """Predict (a cache miss, so it loads) and DeleteHead at once, many times over: whoever
    wins the race, once DeleteHead has returned the head is gone for good."""
    for attempt in range(12):
        head_id = f"racing-{attempt}"
        copy_head(server, stored_head, head_id)
        racing = threading.Thread(target=_predict_quietly, args=(stub, head_id))
        racing.start()
        stub.DeleteHead(pb.DeleteHeadRequest(head_id=head_id), timeout=30)
        code, details = code_of(predict, stub, head_id)
        assert code is grpc.StatusCode.NOT_FOUND, f"attempt {attempt}: {code} {details}"
        racing.join(60)
        code, details = code_of(predict, stub, head_id)
        assert code is grpc.StatusCode.NOT_FOUND, f"attempt {attempt}: {code} {details}"


def _predict_quietly(stub: pb_grpc.TransferServiceStub, head_id: str) -> None:
    with contextlib.suppress(grpc.RpcError):  # either answer is fine while the delete runs
        predict(stub, head_id)
