"""Hostile and malformed input, table-driven over every RPC and request field, through the
real server: every bad request is refused with INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION or RESOURCE_EXHAUSTED and a message naming the field (never UNKNOWN or
INTERNAL, never a traceback), odd-but-valid input is served, and after each row the server
is still SERVING and answers an ordinary Predict.

Requests carry no enum fields (enums only appear in responses), so "unknown enum values" are
covered as unknown field numbers on the wire, which a server must ignore.
"""

# ruff: noqa: E501 - one table row per line reads best

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.domain import MAX_LABEL_CHARS

from tests.conftest import TEST_IMAGE_SIZE, RunningServer, make_settings, start_server
from tests.datasets import bbc_news, fashion_mnist
from tests.reliability.conftest import assert_serving
from tools.reliability.common import (
    METHODS,
    REFUSALS,
    SERVING,
    Outcome,
    invoke,
    invoke_raw,
    png,
    problems_with_stream,
)
from tools.reliability.hostile import (
    FLOAT32_MAX,
    HOSTILE_LABELS,
    HOSTILE_STRINGS,
    HOSTILE_TEXTS,
    INT32_MAX,
    INT32_MIN,
    UINT32_MAX,
    UINT64_MAX,
    bad_images,
    good_images,
)

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# The documented patterns (proto comments): ids and head names are confined to these.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
HEAD_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,47}")
BOMBS = {bad_images()[-3], bad_images()[-2], bad_images()[-1]}


@dataclass(frozen=True)
class Ctx:
    """Real things on the server that requests can name."""

    image_head: str
    text_head: str
    finished_job: str
    one_class_dataset: str
    stub: pb_grpc.TransferServiceStub


@dataclass(frozen=True)
class Case:
    method: str
    build: Callable[[Ctx], Any]  # a request; UploadDataset: a list of chunks; raw: bytes
    expect: frozenset[grpc.StatusCode]
    field: str = ""  # must appear in the error message
    raw: bool = False
    max_seconds: float | None = None
    check: Callable[[Ctx, Any, Outcome], list[str]] | None = None
    marks: tuple[Any, ...] = ()


def _codes(*codes: grpc.StatusCode) -> frozenset[grpc.StatusCode]:
    return frozenset(codes)


# --- request builders ---------------------------------------------------------------------------

TRAIN = fashion_mnist(2, classes=2, seed=31)  # 4 real PNGs, 2 classes
IMAGE = TRAIN[0][0]
TEXTS = bbc_news(2, seed=5)[:4]


def _image_examples(labels: list[str] | None = None) -> list[pb.Example]:
    labels = labels or [label for _, label in TRAIN]
    return [pb.Example(image=TRAIN[i % len(TRAIN)][0], label=lab) for i, lab in enumerate(labels)]


def _fine_tune(**fields: Any) -> Callable[[Ctx], pb.FineTuneRequest]:
    config = fields.pop("config", {})

    def build(ctx: Ctx) -> pb.FineTuneRequest:
        values: dict[str, Any] = {"backbone": "efficientnet_lite0", "examples": _image_examples()}
        values.update(fields)
        return pb.FineTuneRequest(**values, config=pb.TrainingConfig(**{"epochs": 1, **config}))

    return build


def _predict(text: bool = False, **fields: Any) -> Callable[[Ctx], pb.PredictRequest]:
    def build(ctx: Ctx) -> pb.PredictRequest:
        values: dict[str, Any] = {
            "head_id": ctx.text_head if text else ctx.image_head,
            "inputs": [pb.Input(text="a short news text")] if text else [pb.Input(image=IMAGE)],
        }
        values.update(fields)
        return pb.PredictRequest(**values)

    return build


def _upload(*chunks: list[pb.Example]) -> Callable[[Ctx], list[pb.UploadDatasetRequest]]:
    return lambda ctx: [pb.UploadDatasetRequest(examples=chunk) for chunk in chunks]


def _const(request: Any) -> Callable[[Ctx], Any]:
    return lambda ctx: request


def _unknown_fields(message: bytes) -> bytes:
    """`message` plus field 99 as a varint (like an enum value this server never heard of)
    and field 100 as a length-delimited blob."""
    return message + b"\x98\x06\xb9\x60" + b"\xa2\x06\x03abc"


# --- checks for accepted requests ----------------------------------------------------------------


def _trained(labels: set[str]) -> Callable[[Ctx, Any, Outcome], list[str]]:
    """The stream is well-formed, the job completed, and the head serves these classes."""

    def check(ctx: Ctx, request: Any, outcome: Outcome) -> list[str]:
        problems = problems_with_stream(outcome.responses)
        last = outcome.responses[-1] if outcome.responses else None
        if last is None or last.WhichOneof("event") != "completed":
            return [*problems, f"job did not complete: {last}"]
        return problems + _head_serves(ctx, last.completed.head_id, labels, request)

    return check


def _head_serves(ctx: Ctx, head_id: str, labels: set[str], request: Any) -> list[str]:
    stub = ctx.stub
    head = stub.GetHead(pb.GetHeadRequest(head_id=head_id), timeout=30)
    problems = []
    if set(head.class_names) != labels:
        problems.append(f"class names {list(head.class_names)!r} != {sorted(labels)!r}")
    example = request.examples[0]
    single = pb.Input(image=example.image) if example.HasField("image") else pb.Input(text="hi")
    response = stub.Predict(pb.PredictRequest(head_id=head_id, inputs=[single]), timeout=60)
    if response.predictions[0].label not in labels:
        problems.append(f"predicted label {response.predictions[0].label!r} is not a class")
    return problems


def _predicted(count: int) -> Callable[[Ctx, Any, Outcome], list[str]]:
    def check(ctx: Ctx, request: Any, outcome: Outcome) -> list[str]:
        predictions = outcome.responses[0].predictions
        if len(predictions) != count:
            return [f"{len(predictions)} predictions, expected {count}"]
        scores = [s.score for p in predictions for s in p.top_k]
        if not all(math.isfinite(s) and 0 <= s <= 1 for s in scores):
            return [f"scores out of [0, 1]: {scores}"]
        return []

    return check


def _no_events(ctx: Ctx, request: Any, outcome: Outcome) -> list[str]:
    return [f"{len(outcome.responses)} events after the last sequence"] if outcome.responses else []


# --- the table -----------------------------------------------------------------------------------


def _id_cases() -> list[tuple[str, Case]]:
    """Every hostile string in every id/name field."""
    cases: list[tuple[str, Case]] = []
    for value in HOSTILE_STRINGS:
        shown = repr(value)[:24]
        id_ok = bool(ID_PATTERN.fullmatch(value))
        id_codes = _codes(NOT_FOUND) if id_ok else _codes(INVALID)
        if value:
            cases.append(
                (
                    f"FineTune.backbone={shown}",
                    Case("FineTune", _fine_tune(backbone=value), _codes(NOT_FOUND), "backbone"),
                )
            )
            cases.append(
                (
                    f"FineTune.dataset_id={shown}",
                    Case("FineTune", _fine_tune(examples=[], dataset_id=value), id_codes, "dataset_id"),
                )
            )  # fmt: skip
            cases.append(
                (
                    f"ListHeads.backbone={shown}",
                    Case("ListHeads", _const(pb.ListHeadsRequest(backbone=value)), _codes(NOT_FOUND), "backbone"),
                )
            )  # fmt: skip
            name_ok = bool(HEAD_NAME_PATTERN.fullmatch(value))
            cases.append(
                (
                    f"FineTune.head_name={shown}",
                    Case(
                        "FineTune",
                        _fine_tune(head_name=value),
                        _codes(OK) if name_ok else _codes(INVALID),
                        "head_name",
                        check=_trained({"t-shirt", "trouser"}) if name_ok else None,
                    ),
                )
            )
        messages: tuple[tuple[str, type[Any] | None, str], ...] = (
            ("Predict", None, "head_id"),
            ("GetHead", pb.GetHeadRequest, "head_id"),
            ("DeleteHead", pb.DeleteHeadRequest, "head_id"),
            ("GetJob", pb.GetJobRequest, "job_id"),
            ("CancelJob", pb.CancelJobRequest, "job_id"),
            ("WatchJob", pb.WatchJobRequest, "job_id"),
        )
        for method, message, key in messages:
            build = _predict(head_id=value) if message is None else _const(message(**{key: value}))
            cases.append((f"{method}.{key}={shown}", Case(method, build, id_codes, key)))
    return cases


def _number_cases() -> list[tuple[str, Case]]:
    bad: list[tuple[str, Any, str]] = [
        ("epochs", 1001, "config.epochs"),
        ("epochs", UINT32_MAX, "config.epochs"),
        ("batch_size", 4097, "config.batch_size"),
        ("batch_size", UINT32_MAX, "config.batch_size"),
        ("trainable_blocks", -2, "config.trainable_blocks"),
        ("trainable_blocks", 99, "config.trainable_blocks"),
        ("trainable_blocks", INT32_MIN, "config.trainable_blocks"),
        ("trainable_blocks", INT32_MAX, "config.trainable_blocks"),
    ]
    bad += [("learning_rate", v, "config.learning_rate") for v in (math.nan, math.inf, -math.inf, -1.0, 1.5, FLOAT32_MAX)]  # fmt: skip
    bad += [("validation_fraction", v, "config.validation_fraction") for v in (math.nan, math.inf, -math.inf, -0.1, 1.0)]  # fmt: skip
    cases = [
        (
            f"FineTune.config.{name}={value!r}",
            Case("FineTune", _fine_tune(config={name: value}), _codes(INVALID), where),
        )
        for name, value, where in bad
    ]
    fine: list[tuple[str, Any]] = [
        ("learning_rate", 1e-45),
        ("validation_fraction", 0.0),
        ("validation_fraction", 0.999),
        ("early_stopping_patience", UINT32_MAX),
        ("seed", UINT64_MAX),
        ("progress_every_steps", UINT32_MAX),
        ("batch_size", 4096),
    ]
    cases += [
        (
            f"FineTune.config.{name}={value!r} (accepted)",
            Case(
                "FineTune",
                _fine_tune(config={name: value}),
                _codes(OK),
                check=_trained({"t-shirt", "trouser"}),
            ),
        )
        for name, value in fine
    ]
    text_examples = [pb.Example(text=t, label=lab) for t, lab in TEXTS]
    cases += [
        ("FineTune.config.augment on text", Case("FineTune", _fine_tune(backbone="minilm_l6", examples=text_examples, config={"augment": True}), _codes(INVALID), "config.augment")),
        ("Predict.top_k=-1", Case("Predict", _predict(top_k=-1), _codes(INVALID), "top_k")),
        ("Predict.top_k=INT32_MIN", Case("Predict", _predict(top_k=INT32_MIN), _codes(INVALID), "top_k")),
        ("Predict.top_k=INT32_MAX (capped)", Case("Predict", _predict(top_k=INT32_MAX), _codes(OK), check=_predicted(1))),
        ("WatchJob.after_sequence=UINT64_MAX", Case("WatchJob", lambda c: pb.WatchJobRequest(job_id=c.finished_job, after_sequence=UINT64_MAX), _codes(OK), check=_no_events)),
        ("CancelJob of a finished job", Case("CancelJob", lambda c: pb.CancelJobRequest(job_id=c.finished_job), _codes(PRECONDITION), "job_id")),
    ]  # fmt: skip
    return cases


def _image_cases() -> list[tuple[str, Case]]:
    cases: list[tuple[str, Case]] = []
    for number, data in enumerate(bad_images()):
        codes = _codes(EXHAUSTED) if data in BOMBS else _codes(INVALID)
        name = f"bad image #{number} ({len(data)} bytes {data[:6]!r})"
        limit = 2.0 if data in BOMBS else None  # refused from the header, not decoded
        examples = [*_image_examples(), pb.Example(image=data, label="t-shirt")]
        cases += [
            (f"Predict.inputs[0].image: {name}", Case("Predict", _predict(inputs=[pb.Input(image=data)]), codes, "inputs[0]", max_seconds=limit)),
            (f"FineTune.examples[4].image: {name}", Case("FineTune", _fine_tune(examples=examples), codes, "examples[4].image", max_seconds=limit)),
            (f"UploadDataset.examples[4].image: {name}", Case("UploadDataset", _upload(examples), codes, "examples[4].image", max_seconds=limit)),
        ]  # fmt: skip
    for number, data in enumerate(good_images()):
        cases.append(
            (
                f"Predict.inputs[0].image: odd but valid #{number} ({data[:4]!r})",
                Case("Predict", _predict(inputs=[pb.Input(image=data)]), _codes(OK), check=_predicted(1)),
            )
        )  # fmt: skip
    big = png(5000, 5000)  # 25 Mpx declared, under the 40 Mpx limit: decoded and served
    cases.append(("Predict: 5000x5000 image under the pixel limit", Case("Predict", _predict(inputs=[pb.Input(image=big)]), _codes(OK), check=_predicted(1))))  # fmt: skip
    return cases


def _text_and_label_cases() -> list[tuple[str, Case]]:
    cases: list[tuple[str, Case]] = []
    for text in HOSTILE_TEXTS:
        codes = _codes(INVALID) if not text.strip() else _codes(OK, INVALID)
        cases.append(
            (
                f"Predict.inputs[0].text={text[:16]!r}",
                Case("Predict", _predict(text=True, inputs=[pb.Input(text=text)]), codes, "inputs[0]"),
            )
        )  # fmt: skip
    cases.append(("Predict: 1 MB text (truncated)", Case("Predict", _predict(text=True, inputs=[pb.Input(text="word " * 200_000)]), _codes(OK), check=_predicted(1))))  # fmt: skip
    for label in HOSTILE_LABELS:
        labels = ["t-shirt", "trouser", "t-shirt", label]
        shown = repr(label)[:20]
        if label.strip() and len(label) <= MAX_LABEL_CHARS:
            case = Case("FineTune", _fine_tune(examples=_image_examples(labels)), _codes(OK), check=_trained(set(labels)))  # fmt: skip
            upload = Case("UploadDataset", _upload(_image_examples(labels)), _codes(OK))
        else:
            case = Case("FineTune", _fine_tune(examples=_image_examples(labels)), _codes(INVALID), "examples[3].label")  # fmt: skip
            upload = Case("UploadDataset", _upload(_image_examples(labels)), _codes(INVALID), "examples[3].label")  # fmt: skip
        cases += [(f"FineTune.examples[3].label={shown}", case), (f"UploadDataset.examples[3].label={shown}", upload)]  # fmt: skip
    image_examples = _image_examples()
    text_examples = [pb.Example(text=t, label=lab) for t, lab in TEXTS]
    many = [pb.Example(text="x", label="ab"[i % 2]) for i in range(100_001)]
    cases += [
        ("Predict: text to an image head", Case("Predict", _predict(inputs=[pb.Input(text="a cat")]), _codes(INVALID), "inputs[0]")),
        ("Predict: image to a text head", Case("Predict", _predict(text=True, inputs=[pb.Input(image=IMAGE)]), _codes(INVALID), "inputs[0]")),
        ("Predict: input with neither image nor text", Case("Predict", _predict(inputs=[pb.Input(image=IMAGE), pb.Input()]), _codes(INVALID), "inputs[1]")),
        ("Predict: no inputs", Case("Predict", _predict(inputs=[]), _codes(INVALID), "inputs")),
        ("Predict: 513 inputs", Case("Predict", _predict(inputs=[pb.Input(image=IMAGE)] * 513), _codes(EXHAUSTED), "inputs")),
        ("FineTune: texts to an image backbone", Case("FineTune", _fine_tune(examples=text_examples), _codes(INVALID), "examples[0]")),
        ("FineTune: images to a text backbone", Case("FineTune", _fine_tune(backbone="minilm_l6", examples=image_examples), _codes(INVALID), "examples[0]")),
        ("FineTune: mixed modalities", Case("FineTune", _fine_tune(examples=[image_examples[0], text_examples[0]]), _codes(INVALID), "examples[1]")),
        ("FineTune: one class", Case("FineTune", _fine_tune(examples=_image_examples(["a", "a", "a"])), _codes(INVALID), "examples")),
        ("FineTune: example with no input", Case("FineTune", _fine_tune(examples=[*image_examples, pb.Example(label="a")]), _codes(INVALID), "examples[4]")),
        ("FineTune: no examples, no dataset", Case("FineTune", _fine_tune(examples=[]), _codes(INVALID), "examples")),
        ("FineTune: examples and dataset_id", Case("FineTune", _fine_tune(dataset_id="ds-0000"), _codes(INVALID), "dataset_id")),
        ("FineTune: one-class uploaded dataset", Case("FineTune", lambda c: pb.FineTuneRequest(backbone="efficientnet_lite0", dataset_id=c.one_class_dataset), _codes(INVALID), "dataset")),
        ("FineTune: 100,001 examples", Case("FineTune", _fine_tune(backbone="minilm_l6", examples=many), _codes(EXHAUSTED), "examples")),
        ("FineTune: unavailable backbone", Case("FineTune", _fine_tune(backbone="resnet18"), _codes(PRECONDITION), "backbone")),
        ("UploadDataset: no chunks", Case("UploadDataset", _upload(), _codes(INVALID), "examples")),
        ("UploadDataset: empty chunks", Case("UploadDataset", _upload([], []), _codes(INVALID), "examples")),
        ("UploadDataset: mixed modalities", Case("UploadDataset", _upload([image_examples[0], text_examples[0]]), _codes(INVALID), "examples[1]")),
        ("UploadDataset: mixed across chunks", Case("UploadDataset", _upload(image_examples, text_examples), _codes(INVALID), "examples[4]")),
        ("UploadDataset: example with no input", Case("UploadDataset", _upload([pb.Example(label="a")]), _codes(INVALID), "examples")),
        ("UploadDataset: empty text", Case("UploadDataset", _upload([pb.Example(text=" ", label="a")]), _codes(INVALID), "examples[0].text")),
        ("UploadDataset: 100,001 examples", Case("UploadDataset", _upload(many), _codes(EXHAUSTED), "examples")),
        ("UploadDataset: chunk over the message limit", Case("UploadDataset", _upload([pb.Example(image=b"x" * (65 * 1024 * 1024), label="a")]), _codes(EXHAUSTED))),
        ("FineTune: request over the message limit", Case("FineTune", _fine_tune(examples=[pb.Example(image=b"x" * (65 * 1024 * 1024), label="a")]), _codes(EXHAUSTED))),
    ]  # fmt: skip
    return cases


def _unknown_field_cases() -> list[tuple[str, Case]]:
    def raw(method: str, build: Callable[[Ctx], Any]) -> Callable[[Ctx], bytes]:
        return lambda ctx: _unknown_fields(build(ctx).SerializeToString())

    return [
        ("ListBackbones with unknown fields", Case("ListBackbones", raw("ListBackbones", _const(pb.ListBackbonesRequest())), _codes(OK), raw=True)),
        ("ListJobs with unknown fields", Case("ListJobs", raw("ListJobs", _const(pb.ListJobsRequest())), _codes(OK), raw=True)),
        ("ListHeads with unknown fields", Case("ListHeads", raw("ListHeads", _const(pb.ListHeadsRequest())), _codes(OK), raw=True)),
        ("GetHead with unknown fields", Case("GetHead", raw("GetHead", lambda c: pb.GetHeadRequest(head_id=c.image_head)), _codes(OK), raw=True)),
        ("Predict with unknown fields", Case("Predict", raw("Predict", _predict()), _codes(OK), raw=True)),
    ]  # fmt: skip


def _echo_cases() -> list[tuple[str, Case]]:
    """Huge values in fields whose errors quote them: the field must still be named."""
    huge_ascii, huge_unicode = "x" * 100_000, "é" * 10_000
    return [
        ("GetHead.head_id of 100k chars", Case("GetHead", _const(pb.GetHeadRequest(head_id=huge_ascii)), _codes(INVALID), "head_id")),
        ("GetJob.job_id of 100k chars", Case("GetJob", _const(pb.GetJobRequest(job_id=huge_ascii)), _codes(INVALID), "job_id")),
        ("FineTune.backbone of 100k chars", Case("FineTune", _fine_tune(backbone=huge_ascii), _codes(NOT_FOUND), "backbone")),
        ("FineTune.head_name of 100k chars", Case("FineTune", _fine_tune(head_name=huge_ascii), _codes(INVALID), "head_name")),
        ("ListHeads.backbone of 10k non-ASCII chars", Case("ListHeads", _const(pb.ListHeadsRequest(backbone=huge_unicode)), _codes(NOT_FOUND), "backbone")),
        ("Predict.head_id of 10k non-ASCII chars", Case("Predict", _predict(head_id=huge_unicode), _codes(INVALID), "head_id")),
    ]  # fmt: skip


# Rows are run in groups (one test per method and kind of hostility) so a failure lists every
# bad row at once and the suite stays fast; the known gaps run one row per test (xfail).
GROUPS: dict[str, list[tuple[str, Case]]] = {}
for _category, _cases in (
    ("ids and names", _id_cases()),
    ("numbers", _number_cases()),
    ("image bytes", _image_cases()),
    ("texts, labels and shapes", _text_and_label_cases()),
    ("unknown fields", _unknown_field_cases()),
):
    for _name, _case in _cases:
        GROUPS.setdefault(f"{_case.method}: {_category}", []).append((_name, _case))
KNOWN_GAPS = _echo_cases()


@pytest.fixture(scope="module")
def ctx(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str, text_head: str
) -> Ctx:
    finished_job = stub.GetHead(pb.GetHeadRequest(head_id=image_head), timeout=30).job_id
    one_class = stub.UploadDataset(
        iter([pb.UploadDatasetRequest(examples=_image_examples(["a", "a"]))]), timeout=60
    ).dataset_id
    return Ctx(image_head, text_head, finished_job, one_class, stub)


def run_row(case: Case, ctx: Ctx, channel: grpc.Channel) -> list[str]:
    """Sends one row's request; what is wrong with the answer (empty: nothing)."""
    request = case.build(ctx)
    started = time.monotonic()
    if case.raw:
        outcome = invoke_raw(channel, case.method, request, timeout=60)
        if outcome.ok and not METHODS[case.method].server_streaming:
            response_type = getattr(pb, METHODS[case.method].output_type.name)
            outcome.responses = [response_type.FromString(r) for r in outcome.responses]
    else:
        outcome = invoke(ctx.stub, case.method, request, timeout=120)
    seconds = time.monotonic() - started
    if outcome.code not in case.expect:
        expected = "/".join(sorted(c.name for c in case.expect))
        return [f"expected {expected}, got {outcome.code.name}: {outcome.details[:300]}"]
    problems = []
    if outcome.code in REFUSALS:
        if case.field not in outcome.details:
            problems.append(f"message does not name {case.field!r}: {outcome.details[:300]}")
        if "Traceback" in outcome.details:
            problems.append("message carries a traceback")
    if case.max_seconds is not None and seconds > case.max_seconds:
        problems.append(f"took {seconds:.1f}s: decoded instead of refused?")
    if outcome.ok and case.check is not None:
        problems += case.check(ctx, request, outcome)
    return problems


@pytest.mark.parametrize("group", list(GROUPS))
def test_hostile_requests(
    group: str, ctx: Ctx, server: RunningServer, channel: grpc.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    failures = []
    for name, case in GROUPS[group]:
        failures += [f"{name}: {problem}" for problem in run_row(case, ctx, channel)]
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        if status != SERVING:
            failures.append(f"{name}: health reads {status} afterwards")
            break
    assert not failures, f"{len(failures)} of {len(GROUPS[group])} rows:\n" + "\n".join(failures)
    assert_serving(server.address, ctx.stub, ctx.image_head)


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=name, marks=case.marks) for name, case in KNOWN_GAPS]
)
def test_hostile_request_known_gaps(
    case: Case, ctx: Ctx, server: RunningServer, channel: grpc.Channel
) -> None:
    problems = run_row(case, ctx, channel)
    assert_serving(server.address, ctx.stub, ctx.image_head)
    assert not problems, problems


@pytest.mark.parametrize("method", list(METHODS))
def test_bytes_that_are_not_a_protobuf_message_get_invalid_argument(
    method: str, server: RunningServer, channel: grpc.Channel, ctx: Ctx
) -> None:
    """Truncated fields, an invalid tag, a wrong wire type and bad UTF-8 in a string field:
    the request cannot be parsed, which is the caller's fault (INVALID_ARGUMENT), not an
    UNKNOWN error from the library's default deserializer."""
    payloads = [
        b"\x00",  # field number 0
        b"\xff",  # truncated varint tag
        b"\x0a\xff\xff\xff\xff\x0f",  # length-delimited field 1, length past the end
        b"\x0b",  # start-group tag, never closed
    ]
    if method not in ("ListBackbones", "ListJobs"):
        payloads.append(b"\x0a\x02\xc3\x28")  # field 1 (a string here) with invalid UTF-8
    failures = []
    for payload in payloads:
        chunks: bytes | list[bytes] = [payload] if METHODS[method].client_streaming else payload
        outcome = invoke_raw(channel, method, chunks, timeout=30)
        if outcome.code != INVALID or "Traceback" in outcome.details:
            failures.append(f"{payload!r}: {outcome.code.name} {outcome.details[:120]}")
    assert not failures, "\n".join(failures)
    assert_serving(server.address, pb_grpc.TransferServiceStub(channel), ctx.image_head)


def test_an_extreme_aspect_ratio_image_costs_no_huge_resize(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    ctx: Ctx,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PNG of 1 x 20000 pixels is far under the pixel limit, so it is decoded; it must then
    cost what a small image costs (or be refused). The server runs in this process, so every
    resize it asks Pillow for is seen here: none may be much bigger than the model input."""
    resizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def spy(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        resizes.append((int(size[0]), int(size[1])))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    request = pb.PredictRequest(head_id=ctx.image_head, inputs=[pb.Input(image=png(1, 20_000))])
    outcome = invoke(stub, "Predict", request, timeout=60)
    assert outcome.code in (OK, INVALID, EXHAUSTED), outcome
    assert outcome.code == OK or "inputs[0]" in outcome.details
    biggest = max((w * h for w, h in resizes), default=0)
    side = TEST_IMAGE_SIZE
    assert biggest <= 16 * side * side, f"resized to {max(resizes, key=lambda s: s[0] * s[1])}"


def test_watch_job_with_a_huge_after_sequence_on_a_stored_job(tmp_path: Path) -> None:
    """Found by the fuzzer: a job no longer held in memory (here: from before a restart) is
    replayed from SQLite, and an after_sequence past int64 made that INTERNAL."""
    store = tmp_path / "store"
    first = start_server(make_settings(store, preload_backbones=[]))
    try:
        with grpc.insecure_channel(first.address) as opened:
            request = pb.FineTuneRequest(
                backbone="efficientnet_lite0",
                examples=_image_examples(),
                config=pb.TrainingConfig(epochs=1),
            )
            events = list(pb_grpc.TransferServiceStub(opened).FineTune(request, timeout=120))
    finally:
        first.stop()
    job_id = events[0].job_id
    second = start_server(make_settings(store, preload_backbones=[]))
    try:
        with grpc.insecure_channel(second.address) as opened:
            stub = pb_grpc.TransferServiceStub(opened)
            for after in (2**63, UINT64_MAX):
                watch = pb.WatchJobRequest(job_id=job_id, after_sequence=after)
                outcome = invoke(stub, "WatchJob", watch, timeout=30)
                assert outcome.code in (OK, INVALID), f"after_sequence={after}: {outcome}"
                assert outcome.responses == [] or outcome.code != OK
                assert outcome.code == OK or "after_sequence" in outcome.details
    finally:
        second.stop()
