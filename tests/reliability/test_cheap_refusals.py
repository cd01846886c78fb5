"""Issue 15, the EPS spam of bench/noisy_neighbour.py: a request whose bytes cannot work is
refused as cheaply as possible, and its tenant pays for it. The image format is checked by its
leading bytes before Pillow, a thread hop or the batcher; a call that ends INVALID_ARGUMENT
costs its tenant more admission tokens than a good call, so a caller looping on garbage is
slowed well below the rate its good calls get."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.backbones import preprocess
from transfer_service.backbones.preprocess import check_image_format, decode_image
from transfer_service.edge.tenant_admission import AdmissionLimits, TenantAdmission
from transfer_service.errors import InvalidArgumentError
from transfer_service.predict.batcher import BackboneBatcher
from transfer_service.predict.predictor import Predictor

from tests.conftest import RunningServer, make_settings, start_server
from tests.datasets import fashion_mnist
from tests.reliability.test_decoders import WEDGING_EPS, _psd, saved

GARBAGE_TOKEN = "garbage-token-0123456789"
RATE = 20.0
BURST = 2


def _allowed_samples() -> dict[str, bytes]:
    picture = Image.new("RGB", (8, 8), (10, 200, 30))
    samples = {fmt: saved(picture, fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP")}
    samples["TIFF"] = saved(picture, "TIFF")
    samples["TIFF big-endian"] = saved(picture, "TIFF", tiffinfo={}, big_endian=True)
    return samples


def _refused_samples() -> dict[str, bytes]:
    picture = Image.new("RGB", (8, 8), (10, 200, 30))
    refused = {fmt: saved(picture, fmt) for fmt in ("PCX", "TGA", "SGI", "ICO", "PPM", "DDS")}
    refused["EPS"] = WEDGING_EPS
    refused["PSD"] = _psd(8, 8)
    refused["text"] = b"hello, not an image at all"
    return refused


def test_the_format_check_agrees_with_pillows_own() -> None:
    """Every allowed format Pillow writes passes the byte check; every other format Pillow
    knows fails it, and Pillow's own accept functions (what `Image.open(formats=...)` asks)
    agree on every sample."""
    Image.init()
    pillow_accepts = [Image.OPEN[name][1] for name in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")]
    for name, data in _allowed_samples().items():
        check_image_format(data, "x")  # raises if refused
        assert any(accept(data[:16]) for accept in pillow_accepts if accept), name
    for name, data in _refused_samples().items():
        with pytest.raises(InvalidArgumentError) as refused:
            check_image_format(data, "inputs[3]")
        assert refused.value.message.startswith("inputs[3]: "), refused.value.message
        assert "are accepted" in refused.value.message
        assert not any(accept(data[:16]) for accept in pillow_accepts if accept), name


def test_refused_bytes_never_reach_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pillow(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Pillow opened bytes of a refused format")

    monkeypatch.setattr(preprocess.Image, "open", no_pillow)
    for data in _refused_samples().values():
        with pytest.raises(InvalidArgumentError):
            decode_image(data, "image", 10**7)


def test_a_refused_image_is_answered_before_any_decoding_or_batching(
    server: RunningServer,
    stub: pb_grpc.TransferServiceStub,
    image_head: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An EPS in a Predict is INVALID_ARGUMENT with its position, and nothing past the byte
    check ran: no decoding in the pool, no lone run on the compute thread, no queued batch."""
    reached: list[str] = []

    def spy(name: str, real: Any) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            reached.append(name)
            return real(*args, **kwargs)

        return recorded

    for cls, name in (
        (BackboneBatcher, "run_alone"),
        (BackboneBatcher, "submit"),
        (BackboneBatcher, "expect"),
        (Predictor, "_prepare"),
        (Predictor, "_predict_in_chunks"),
    ):
        monkeypatch.setattr(cls, name, spy(name, getattr(cls, name)))
    good = fashion_mnist(1, split="test", classes=1, seed=5)[0][0]
    request = pb.PredictRequest(
        head_id=image_head, inputs=[pb.Input(image=good), pb.Input(image=WEDGING_EPS)]
    )
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]: unsupported image format (EPS/PostScript)" in str(refused.value.details())
    assert reached == []
    # The same spies see a good request through (they are in the path).
    stub.Predict(pb.PredictRequest(head_id=image_head, inputs=[pb.Input(image=good)]), timeout=60)
    assert reached


def test_an_invalid_call_costs_more_tokens_with_a_bounded_debt() -> None:
    async def scenario() -> None:
        now = [0.0]  # the bucket's clock stands still unless moved
        admission = TenantAdmission(
            AdmissionLimits(10, 1, 0, 0.4, invalid_call_tokens=4), clock=lambda: now[0]
        )
        assert await admission.take_token("a") is None  # the burst's one token
        admission.charge_invalid_call("a")  # 4 more: 4 in debt
        # The next token is 5 tokens (0.5 s) away at 10 a second: past the 0.4 s hold bound.
        refusal = await admission.take_token("a")
        assert refusal is not None and refusal.retry_after_seconds == pytest.approx(0.5)
        assert await admission.take_token("b") is None  # another tenant pays nothing
        # Any number of invalid calls leave at most a hold bound's worth of debt (4 tokens,
        # not 404): the tenant is served again 0.6 s later.
        for _ in range(100):
            admission.charge_invalid_call("a")
        now[0] += 0.6
        assert await admission.take_token("a") is None

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def rated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        make_settings(
            Path(tmp_path_factory.mktemp("garbage")),
            auth_tokens=f"{GARBAGE_TOKEN}=garbage",
            tenant_requests_per_second=RATE,
            tenant_request_burst=BURST,
            tenant_admission_hold_ms=1000,
        )
    )
    yield running
    running.stop()


def test_a_caller_looping_on_invalid_calls_gets_a_fifth_of_the_rate(
    rated_server: RunningServer,
) -> None:
    """Sequential invalid Predicts (INVALID_ARGUMENT each) run at RATE / 5, sequential
    ListHeads (OK) at RATE: the rate is the same, the invalid calls cost 5 tokens each."""

    def calls_in(seconds: float, call: Any) -> tuple[int, set[str]]:
        time.sleep(1.2)  # the bucket refills (and any debt is paid) between the two
        codes = set()
        count = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                call()
                codes.add("OK")
            except grpc.RpcError as error:
                codes.add(error.code().name)
            count += 1
        return count, codes

    metadata = (("authorization", f"Bearer {GARBAGE_TOKEN}"),)
    # No head id: INVALID_ARGUMENT without a trained head (what counts is the status).
    eps = pb.PredictRequest(head_id="", inputs=[pb.Input(image=WEDGING_EPS)])
    with grpc.insecure_channel(rated_server.address) as channel:
        stub = pb_grpc.TransferServiceStub(channel)
        good, good_codes = calls_in(
            2.0, lambda: stub.ListHeads(pb.ListHeadsRequest(), timeout=5, metadata=metadata)
        )
        garbage, garbage_codes = calls_in(
            2.0, lambda: stub.Predict(eps, timeout=5, metadata=metadata)
        )
    assert good_codes == {"OK"}
    assert garbage_codes == {"INVALID_ARGUMENT"}, garbage_codes
    assert good >= RATE * 2.0 * 0.8, good
    assert garbage <= BURST + RATE * 2.0 / 5 + 3, garbage
