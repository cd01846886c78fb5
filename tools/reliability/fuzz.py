"""Property-based fuzzing (hypothesis) of every TransferService RPC against a live server.

    python -m tools.reliability.fuzz --examples 5000          # make fuzz: >= 5,000 per RPC
    python -m tools.reliability.fuzz --examples 200 --methods Predict,FineTune
    python -m tools.reliability.fuzz --address 127.0.0.1:50051  # an already running server

Requests are built field by field from strategies mixing valid values (known backbones,
heads, jobs, datasets; real images) with garbage: hostile strings, random/truncated/bomb image
bytes, every numeric limit, NaN and infinities, plus unknown fields appended on the wire.
Every call must end OK or with INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION /
RESOURCE_EXHAUSTED within its deadline (else: UNKNOWN/INTERNAL = bug, DEADLINE_EXCEEDED =
hang, UNAVAILABLE = crash); a successful FineTune stream must be well-formed and its job must
not fail as INTERNAL; the server must stay SERVING.

`--corrupt` instead sends bytes that are not a valid protobuf message (mutated requests); each
must get INVALID_ARGUMENT.
FineTune stays cheap: at most 8 examples and 3 epochs when blocks are unfrozen.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, Phase, Verbosity, given, reject, seed, settings
from hypothesis import strategies as st
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc

from tests.datasets import bbc_news, fashion_mnist
from tools.reliability.common import (
    ACCEPTABLE,
    BIG_MESSAGES,
    METHODS,
    REQUEST_TYPES,
    SERVING,
    Outcome,
    ServerProcess,
    health_status,
    invoke_raw,
    problems_with_stream,
    server_env,
)
from tools.reliability.hostile import (
    HOSTILE_LABELS,
    HOSTILE_STRINGS,
    HOSTILE_TEXTS,
    NUMBERS_FLOAT,
    NUMBERS_INT32,
    NUMBERS_UINT32,
    NUMBERS_UINT64,
    UINT32_MAX,
    UINT64_MAX,
    bad_images,
    good_images,
)

# Creators first (datasets, jobs, heads), the destroyer last.
ORDER = (
    "ListBackbones",
    "UploadDataset",
    "FineTune",
    "Predict",
    "GetJob",
    "WatchJob",
    "CancelJob",
    "ListJobs",
    "ListHeads",
    "GetHead",
    "DeleteDataset",
    "DeleteHead",
)
BACKBONES = ("efficientnet_lite0", "minilm_l6", "resnet18", "efficientnet_lite2")
OTHER_BACKBONES = ("resnet18", "resnet50", "efficientnet_lite2", "mobilenet_v3_large")
STREAM_DEADLINE_S = 120.0
UNARY_DEADLINE_S = 30.0


# --- what the fuzzer knows about the server ------------------------------------------------


@dataclass
class Pools:
    """Ids that exist on the server, so generated requests reach past the NOT_FOUND checks.
    `protected` heads (e.g. a test session's) are predicted on but never deleted."""

    protected: list[str] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    modality: dict[str, str] = field(default_factory=dict)  # head id -> "image" / "text"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def all_heads(self) -> list[str]:
        with self.lock:
            return self.protected + self.heads


def _pick(source: Callable[[], list[str]]) -> st.SearchStrategy[str]:
    def choose(index: int) -> str:
        values = source()
        return values[index % len(values)] if values else ""

    return st.integers(0, 2**16).map(choose)


# --- strategies ------------------------------------------------------------------------------
# Each field is valid most of the time and hostile otherwise, so that a request as a whole
# often gets past validation into the deep paths (decoding, training, batching), while every
# field is still fuzzed. `_sometimes(draw, percent)` leans towards the valid branch when
# hypothesis shrinks (smaller integers), so minimal failing requests stay readable.


def _sometimes(draw: st.DrawFn, percent: int) -> bool:
    """True `percent`% of the time; shrinks towards False."""
    return bool(draw(st.integers(0, 99)) >= 100 - percent)


@functools.cache
def _hostile_strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,70}", fullmatch=True),
        st.text(max_size=40),
    )


@functools.cache
def _valid_names() -> st.SearchStrategy[str]:
    return st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True)


@functools.cache
def _hostile_images() -> st.SearchStrategy[bytes]:
    good = good_images()

    def mutate(args: tuple[int, int, int, int]) -> bytes:
        which, position, value, how = args
        data = bytearray(good[which % len(good)])
        position %= max(len(data), 1)
        if how == 0:
            data[position] = value
        elif how == 1:
            del data[position:]
        else:
            data[position:position] = bytes([value]) * 16
        return bytes(data)

    return st.one_of(
        st.sampled_from(bad_images()),
        st.binary(max_size=300),
        st.tuples(
            st.integers(0, 99), st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)
        ).map(mutate),
    )


@functools.cache
def _good_texts() -> st.SearchStrategy[str]:
    return st.sampled_from([text[:400] for text, _ in bbc_news(2, seed=3)])


@functools.cache
def _hostile_texts() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_TEXTS), st.text(max_size=200))


@st.composite
def _image(draw: st.DrawFn, hostile: int = 25) -> bytes:
    if _sometimes(draw, hostile):
        return draw(_hostile_images())
    return draw(st.sampled_from(good_images()))


@st.composite
def _text(draw: st.DrawFn, hostile: int = 25) -> str:
    return draw(_hostile_texts() if _sometimes(draw, hostile) else _good_texts())


@st.composite
def _label(draw: st.DrawFn) -> str:
    if _sometimes(draw, 10):
        return draw(st.one_of(st.sampled_from(HOSTILE_LABELS), st.text(max_size=8)))
    return draw(st.sampled_from(("a", "b", "c")))


@st.composite
def _input(draw: st.DrawFn, message: type[Any], modality: str, hostile: int = 25) -> Any:
    """An Input or Example of `modality` ("image"/"text"), sometimes of the other or none;
    its value hostile `hostile`% of the time."""
    if _sometimes(draw, hostile // 2):
        modality = draw(st.sampled_from(("image", "text", "none")))
    built = message()
    if modality == "image":
        built.image = draw(_image(hostile))
    elif modality == "text":
        built.text = draw(_text(hostile))
    return built


def _int32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(NUMBERS_INT32), st.integers(-(2**31), 2**31 - 1))


def _uint32() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(NUMBERS_UINT32), st.integers(0, UINT32_MAX))


def _uint64() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(NUMBERS_UINT64), st.integers(0, UINT64_MAX))


def _float32() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(NUMBERS_FLOAT), st.floats(width=32))


@st.composite
def _config(draw: st.DrawFn) -> pb.TrainingConfig:
    """Every field fuzzed, but a job that passes validation stays small: at most 5 epochs of a
    linear probe (microseconds each) or 2 with unfrozen blocks."""
    config = pb.TrainingConfig()
    hostile = 15
    blocks = 0
    if _sometimes(draw, 25):
        blocks = draw(st.sampled_from((1, -1, 2, -2, 99, 2**31 - 1, -(2**31))))
    config.trainable_blocks = blocks
    epochs = draw(st.integers(0, 5) if blocks == 0 else st.integers(1, 2))
    config.epochs = draw(st.sampled_from((1001, UINT32_MAX))) if _sometimes(draw, 5) else epochs
    if _sometimes(draw, 30):
        config.batch_size = (
            draw(_uint32()) if _sometimes(draw, hostile * 3) else draw(st.integers(1, 8))
        )
    if _sometimes(draw, 30):
        config.learning_rate = (
            draw(_float32()) if _sometimes(draw, hostile * 3) else draw(st.floats(1e-4, 1.0))
        )
    if _sometimes(draw, 30):
        config.validation_fraction = (
            draw(_float32()) if _sometimes(draw, hostile * 3) else draw(st.floats(0.0, 0.5))
        )
    if _sometimes(draw, 30):
        config.early_stopping_patience = draw(_uint32())
    if _sometimes(draw, 30):
        config.augment = draw(st.booleans())
    if _sometimes(draw, 30):
        config.seed = draw(_uint64())
    if _sometimes(draw, 30):
        config.progress_every_steps = draw(_uint32())
    return config


@st.composite
def _examples(draw: st.DrawFn, modality: str) -> list[pb.Example]:
    if _sometimes(draw, 5):
        return []
    out = []
    for _ in range(draw(st.integers(1, 8))):
        # One bad example spoils a whole set: keep each rarely bad, so some sets train.
        example: pb.Example = draw(_input(pb.Example, modality, hostile=6))
        example.label = draw(_label())
        out.append(example)
    return out


@st.composite
def _fine_tune(draw: st.DrawFn, pools: Pools) -> pb.FineTuneRequest:
    backbone = draw(st.sampled_from(("efficientnet_lite0", "minilm_l6")))
    modality = "text" if backbone == "minilm_l6" else "image"
    if _sometimes(draw, 15):
        backbone = draw(st.one_of(st.sampled_from(OTHER_BACKBONES), _hostile_strings()))
    request = pb.FineTuneRequest(backbone=backbone, config=draw(_config()))
    if _sometimes(draw, 15):
        request.head_name = draw(_hostile_strings())
    elif _sometimes(draw, 50):
        request.head_name = draw(_valid_names())
    if _sometimes(draw, 15):
        request.dataset_id = draw(_pick(lambda: list(pools.datasets)) | _hostile_strings())
        if _sometimes(draw, 70):
            return request
    request.examples.extend(draw(_examples(modality)))
    return request


@st.composite
def _predict(draw: st.DrawFn, pools: Pools) -> pb.PredictRequest:
    head_id = draw(_pick(pools.all_heads))
    modality = pools.modality.get(head_id, "image")
    if _sometimes(draw, 15):
        head_id = draw(_hostile_strings())
    count = draw(st.integers(0, 6)) if _sometimes(draw, 10) else draw(st.integers(1, 6))
    request = pb.PredictRequest(
        head_id=head_id, inputs=[draw(_input(pb.Input, modality)) for _ in range(count)]
    )
    if _sometimes(draw, 40):
        request.top_k = draw(_int32())
    request.return_embedding = draw(st.booleans())
    return request


@st.composite
def _upload(draw: st.DrawFn) -> list[pb.UploadDatasetRequest]:
    modality = draw(st.sampled_from(("image", "text")))
    chunks = draw(st.integers(0, 3)) if _sometimes(draw, 10) else draw(st.integers(1, 3))
    return [pb.UploadDatasetRequest(examples=draw(_examples(modality))) for _ in range(chunks)]


@st.composite
def _id(draw: st.DrawFn, source: Callable[[], list[str]]) -> str:
    if _sometimes(draw, 40):
        return draw(st.one_of(_hostile_strings(), st.just("job-0000000000000000")))
    return draw(_pick(source))


def _unknown_fields() -> st.SearchStrategy[bytes]:
    """Valid wire-format fields with numbers no request uses (like unknown enum values or
    fields from a newer client): a server must ignore them."""

    def encode(parts: list[tuple[int, int, int, bytes]]) -> bytes:
        out = bytearray()
        for number, wire, value, blob in parts:
            out += _varint(number << 3 | wire)
            if wire == 0:
                out += _varint(value)
            elif wire == 1:
                out += value.to_bytes(8, "little")
            elif wire == 2:
                out += _varint(len(blob)) + blob
            else:
                out += (value & 0xFFFFFFFF).to_bytes(4, "little")
        return bytes(out)

    field_ = st.tuples(
        st.integers(100, 2**29 - 1),
        st.sampled_from((0, 1, 2, 5)),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=20),
    )
    return st.one_of(st.just(b""), st.just(b""), st.lists(field_, max_size=3).map(encode))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def request_strategies(pools: Pools) -> dict[str, st.SearchStrategy[Any]]:
    """One strategy per RPC: a request message (UploadDataset: a list of chunk messages)."""
    jobs = _id(lambda: list(pools.jobs))
    heads = _id(pools.all_heads)
    return {
        "ListBackbones": st.just(pb.ListBackbonesRequest()),
        "FineTune": _fine_tune(pools),
        "Predict": _predict(pools),
        "UploadDataset": _upload(),
        "GetJob": st.builds(pb.GetJobRequest, job_id=jobs),
        "ListJobs": st.just(pb.ListJobsRequest()),
        "CancelJob": st.builds(pb.CancelJobRequest, job_id=jobs),
        "WatchJob": st.builds(pb.WatchJobRequest, job_id=jobs, after_sequence=_uint64()),
        "ListHeads": st.builds(
            pb.ListHeadsRequest,
            backbone=st.one_of(st.just(""), st.sampled_from(BACKBONES), _hostile_strings()),
        ),
        "GetHead": st.builds(pb.GetHeadRequest, head_id=heads),
        "DeleteDataset": st.builds(
            pb.DeleteDatasetRequest, dataset_id=_id(lambda: list(pools.datasets))
        ),
        "DeleteHead": st.builds(pb.DeleteHeadRequest, head_id=_id(lambda: list(pools.heads))),
    }


# --- the checks --------------------------------------------------------------------------------


def describe(request: Any, limit: int = 600) -> str:
    if isinstance(request, list):
        return "[" + ", ".join(describe(chunk, limit // 3) for chunk in request) + "]"
    text = text_format.MessageToString(request, as_one_line=True, as_utf8=True)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def check(method: str, request: Any, outcome: Outcome) -> list[str]:
    """What is wrong with how the server answered `request` (empty: nothing)."""
    code = outcome.code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return [f"hang: no answer within the deadline ({outcome.seconds:.1f}s)"]
    if code == grpc.StatusCode.UNAVAILABLE:
        return [f"server unavailable (crash?): {outcome.details}"]
    if code not in ACCEPTABLE:
        return [f"{code.name}: {outcome.details[:300]}"]
    if "Traceback" in outcome.details:
        return [f"{code.name} with a traceback in its message"]
    if not outcome.ok:
        return []
    problems: list[str] = []
    if method in ("FineTune", "WatchJob"):
        events = [pb.FineTuneEvent.FromString(raw) for raw in outcome.responses]
        problems += problems_with_stream(events)
    elif method == "Predict":
        response = pb.PredictResponse.FromString(outcome.responses[0])
        if len(response.predictions) != len(request.inputs):
            problems.append(
                f"{len(response.predictions)} predictions for {len(request.inputs)} inputs"
            )
        for prediction in response.predictions:
            scores = [s.score for s in prediction.top_k]
            if not all(math.isfinite(s) and -1e-6 <= s <= 1 + 1e-6 for s in scores):
                problems.append(f"scores out of [0, 1]: {scores}")
            if scores != sorted(scores, reverse=True):
                problems.append(f"top_k not best first: {scores}")
    return problems


# --- running ---------------------------------------------------------------------------------


class Violation(AssertionError):
    pass


@dataclass
class MethodReport:
    method: str
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)  # the first 50
    violation_count: int = 0
    seconds: float = 0.0
    error: str = ""
    slowest: float = 0.0
    slowest_request: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations and not self.error

    def record(self, request: Any, outcome: Outcome) -> None:
        self.sent += 1
        self.codes[outcome.code.name] += 1
        if outcome.seconds > self.slowest:
            self.slowest = outcome.seconds
            self.slowest_request = describe(request, 200)

    def line(self) -> str:
        codes = ", ".join(f"{code} {count}" for code, count in self.codes.most_common())
        verdict = "ok" if self.ok else f"{self.violation_count} VIOLATIONS"
        return (
            f"{self.method:14s} {self.sent:6d} requests {self.seconds:7.1f}s "
            f"(slowest {self.slowest:.2f}s)  {verdict}  [{codes}]"
        )


class Fuzzer:
    """Sends generated requests to `address`; `alive` says whether the server still runs."""

    def __init__(
        self,
        address: str,
        pools: Pools,
        *,
        alive: Callable[[], bool] | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.address = address
        self.pools = pools
        self.channel = grpc.insecure_channel(address, options=BIG_MESSAGES)
        self.alive = alive or (lambda: health_status(address) == SERVING)
        self.log = log
        self.strategies = request_strategies(pools)

    def close(self) -> None:
        self.channel.close()

    def trim_heads(self, keep: int) -> None:
        """Deletes all but the newest `keep` heads the fuzzer made, so that listing heads
        stays cheap for the rest of a long run (plain deletes, not counted)."""
        stub = pb_grpc.TransferServiceStub(self.channel)
        with self.pools.lock:
            doomed = self.pools.heads[:-keep] if keep else list(self.pools.heads)
            self.pools.heads = self.pools.heads[len(doomed) :]
        for head_id in doomed:
            with contextlib.suppress(grpc.RpcError):
                stub.DeleteHead(pb.DeleteHeadRequest(head_id=head_id), timeout=UNARY_DEADLINE_S)

    def send(self, method: str, request: Any, tail: bytes = b"") -> Outcome:
        deadline = (
            STREAM_DEADLINE_S
            if METHODS[method].server_streaming or METHODS[method].client_streaming
            else UNARY_DEADLINE_S
        )
        if isinstance(request, list):
            payload: bytes | list[bytes] = [m.SerializeToString() + tail for m in request]
        else:
            payload = request.SerializeToString() + tail
        return invoke_raw(self.channel, method, payload, timeout=deadline)

    def learn(self, method: str, request: Any, outcome: Outcome) -> None:
        """Adds what a successful call created to the pools (and drops what it deleted)."""
        if not outcome.ok:
            return
        with self.pools.lock:
            if method == "FineTune" and outcome.responses:
                events = [pb.FineTuneEvent.FromString(raw) for raw in outcome.responses]
                self.pools.jobs.append(events[0].job_id)
                if events[-1].WhichOneof("event") == "completed":
                    head_id = events[-1].completed.head_id
                    self.pools.heads.append(head_id)
                    text = request.backbone == "minilm_l6"
                    self.pools.modality[head_id] = "text" if text else "image"
            elif method == "UploadDataset":
                response = pb.UploadDatasetResponse.FromString(outcome.responses[0])
                self.pools.datasets.append(response.dataset_id)
            elif method == "DeleteHead" and request.head_id in self.pools.heads:
                self.pools.heads.remove(request.head_id)
            elif method == "DeleteDataset" and request.dataset_id in self.pools.datasets:
                self.pools.datasets.remove(request.dataset_id)

    def fuzz(
        self,
        method: str,
        examples: int,
        *,
        time_limit_s: float = 3600.0,
        seed_value: int | None = None,
        corrupt: bool = False,
        keep_going: bool = False,
    ) -> MethodReport:
        """Up to `examples` generated requests. On a violation hypothesis shrinks it to a
        minimal request and stops, unless `keep_going` (then every violation is recorded and
        the run continues: the campaign mode)."""
        report = MethodReport(method)
        strategy = self.strategies[method]
        tails = _unknown_fields()
        request_type = REQUEST_TYPES[method]
        started = time.monotonic()
        stop_at = started + time_limit_s

        def one(data: st.DataObject) -> None:
            if time.monotonic() > stop_at:
                reject()
            request = data.draw(strategy, label="request")
            if corrupt:
                outcome, problems = self._corrupt_call(method, request, request_type, data)
            else:
                tail = data.draw(tails, label="unknown fields")
                outcome = self.send(method, request, tail)
                problems = check(method, request, outcome)
                self.learn(method, request, outcome)
            report.record(request, outcome)
            if not problems and outcome.code == grpc.StatusCode.UNAVAILABLE:
                problems = ["UNAVAILABLE"]
            if problems:
                line = f"{method}: {'; '.join(problems)} <- {describe(request)}"
                report.violation_count += 1
                if len(report.violations) < 50:
                    report.violations.append(line)
                if report.violation_count <= 5:
                    self.log(f"VIOLATION {line[:400]}")
                if not self.alive():
                    report.error = "the server stopped answering health checks"
                    raise Violation(line)
                if not keep_going:
                    raise Violation(line)

        test = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=seed_value is None,
            verbosity=Verbosity.quiet,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
            report_multiple_bugs=False,
        )(given(st.data())(one))
        if seed_value is not None:
            test = seed(seed_value)(test)
        try:
            test()
        except Violation:
            pass  # recorded above; hypothesis re-raises the shrunk one
        except Exception as error:  # hypothesis' own (Flaky, Unsatisfiable...)
            if not report.violations:
                report.error = f"{type(error).__name__}: {str(error)[:300]}"
        report.seconds = time.monotonic() - started
        if not report.error and not self.alive():
            report.error = "the server stopped answering health checks"
        return report

    def _corrupt_call(
        self, method: str, request: Any, request_type: type[Any], data: st.DataObject
    ) -> tuple[Outcome, list[str]]:
        """Mutates the serialised request until it no longer parses, sends it raw, and
        expects INVALID_ARGUMENT."""
        chunks = request if isinstance(request, list) else [request]
        blobs = [chunk.SerializeToString() for chunk in chunks] or [b""]
        index = data.draw(st.integers(0, len(blobs) - 1), label="chunk")
        blob = bytearray(blobs[index])
        for _ in range(data.draw(st.integers(1, 4), label="mutations")):
            position = data.draw(st.integers(0, len(blob)), label="position")
            how = data.draw(st.integers(0, 3), label="how")
            if how == 0 and blob:
                blob[min(position, len(blob) - 1)] = data.draw(st.integers(0, 255))
            elif how == 1:
                del blob[position:]
            elif how == 2:
                blob[position:position] = data.draw(st.binary(min_size=1, max_size=8))
            else:
                blob[position:position] = data.draw(
                    st.sampled_from(
                        (b"\x00", b"\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x02\xc3(")
                    )
                )
        try:
            request_type.FromString(bytes(blob))
        except DecodeError:
            pass
        else:
            reject()  # still a valid message: the structured fuzzer covers those
        blobs[index] = bytes(blob)
        payload: bytes | list[bytes] = blobs if METHODS[method].client_streaming else blobs[0]
        outcome = invoke_raw(self.channel, method, payload, timeout=UNARY_DEADLINE_S)
        if outcome.code != grpc.StatusCode.INVALID_ARGUMENT:
            return outcome, [
                f"undecodable request got {outcome.code.name} (want INVALID_ARGUMENT): "
                f"{outcome.details[:200]}"
            ]
        return outcome, []


def seed_pools(address: str, pools: Pools) -> None:
    """One image head, one text head and one dataset, so requests can name real things."""
    with grpc.insecure_channel(address, options=BIG_MESSAGES) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        for backbone, examples in (
            (
                "efficientnet_lite0",
                [pb.Example(image=i, label=label) for i, label in fashion_mnist(3, classes=2)],
            ),
            ("minilm_l6", [pb.Example(text=t, label=label) for t, label in bbc_news(2, seed=2)]),
        ):
            request = pb.FineTuneRequest(
                backbone=backbone,
                head_name="fuzz-seed",
                examples=examples,
                config=pb.TrainingConfig(epochs=2),
            )
            events = list(stub.FineTune(request, timeout=STREAM_DEADLINE_S))
            pools.jobs.append(events[0].job_id)
            head_id = events[-1].completed.head_id
            pools.protected.append(head_id)
            pools.modality[head_id] = "text" if backbone == "minilm_l6" else "image"
        upload = pb.UploadDatasetRequest(
            examples=[pb.Example(image=i, label=label) for i, label in fashion_mnist(2, classes=2)]
        )
        pools.datasets.append(stub.UploadDataset(iter([upload]), timeout=60).dataset_id)


def run_fuzz(
    address: str,
    pools: Pools,
    *,
    examples: int,
    methods: Sequence[str] = ORDER,
    time_limit_s: float = 3600.0,
    seed_value: int | None = None,
    corrupt: bool = False,
    keep_going: bool = False,
    alive: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[MethodReport]:
    """Fuzzes each method in turn (each gets an equal share of the time limit)."""
    fuzzer = Fuzzer(address, pools, alive=alive, log=log)
    reports = []
    try:
        for number, method in enumerate(methods):
            share = time_limit_s / len(methods)
            report = fuzzer.fuzz(
                method,
                examples,
                time_limit_s=share,
                seed_value=None if seed_value is None else seed_value + number,
                corrupt=corrupt,
                keep_going=keep_going,
            )
            reports.append(report)
            log(report.line())
            if report.error:
                break
            if method == "FineTune":
                fuzzer.trim_heads(keep=40)
    finally:
        fuzzer.close()
    return reports


def _process_alive(server: ServerProcess) -> Callable[[], bool]:
    return lambda: server.alive() and health_status(server.address) == SERVING


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="requests per RPC")
    parser.add_argument("--methods", default=",".join(ORDER))
    parser.add_argument("--minutes", type=float, default=120.0, help="overall time limit")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--corrupt", action="store_true", help="send undecodable protobuf")
    parser.add_argument("--address", default=None, help="fuzz this server instead of a new one")
    parser.add_argument(
        "--stop-on-first",
        action="store_true",
        help="shrink and stop at the first violation per RPC (default: record all, go on)",
    )
    arguments = parser.parse_args(argv)
    methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ORDER)
    if unknown:
        parser.error(f"unknown methods: {sorted(unknown)}")
    seed_value = arguments.seed if arguments.seed is not None else random.randrange(2**31)
    print(f"fuzz: {arguments.examples} per RPC, seed {seed_value}, corrupt={arguments.corrupt}")

    with contextlib.ExitStack() as stack:
        alive: Callable[[], bool] | None = None
        server: ServerProcess | None = None
        address = arguments.address
        if address is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-")))
            # Every answer is checked, not admission: the per-tenant rate (100 calls/s by
            # default) would hold this one sequential caller to it.
            env = server_env(
                work / "store",
                preload="efficientnet_lite0,minilm_l6",
                extra={"TRANSFER_TENANT_REQUESTS_PER_SECOND": "0"},
            )
            server = stack.enter_context(ServerProcess(env, work / "server.log"))
            server.wait_serving()
            address = server.address
            alive = _process_alive(server)

        pools = Pools()
        seed_pools(address, pools)
        started = time.monotonic()
        reports = run_fuzz(
            address,
            pools,
            examples=arguments.examples,
            methods=methods,
            time_limit_s=arguments.minutes * 60,
            seed_value=seed_value,
            corrupt=arguments.corrupt,
            keep_going=not arguments.stop_on_first,
            alive=alive,
            log=lambda line: print(line, flush=True),
        )
        total = sum(r.sent for r in reports)
        bad = sum(r.violation_count for r in reports) + sum(bool(r.error) for r in reports)
        print(f"total: {total} requests in {time.monotonic() - started:.0f}s; problems: {bad}")
        for report in reports:
            print(f"  {report.method} slowest ({report.slowest:.2f}s): {report.slowest_request}")
            for line in report.violations[:5]:
                print(f"  - {line[:500]}")
            if report.error:
                print(f"  - {report.method}: {report.error}")
        if server is not None and "Traceback" in server.log_tail(10**7):
            print("note: the server log holds a traceback (see the log for the call)")
        short = [r.method for r in reports if r.sent < arguments.examples]
        if short:
            print(f"note: fewer than {arguments.examples} requests for {short} (time limit?)")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
