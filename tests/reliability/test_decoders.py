"""Hostile and unusual image files (issue 15): only JPEG, PNG, WebP, GIF, BMP and TIFF ever
reach a Pillow plugin (EPS would run Ghostscript, which a 60-byte file wedges forever), 16-bit
and float samples keep their gradient instead of clipping to white, and EXIF orientation turns
the picture upright. Unit-level through `decode_image`, plus one EPS through a real Predict.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from transfer_client.proto import transfer_service_pb2 as pb
from transfer_client.proto import transfer_service_pb2_grpc as pb_grpc
from transfer_service.backbones.preprocess import ImagePreprocessor, decode_image
from transfer_service.domain import ModelInput
from transfer_service.errors import InvalidArgumentError

from tests.conftest import RunningServer
from tests.reliability.conftest import assert_serving, probe_images

ACCEPTED = "JPEG, PNG, WebP, GIF, BMP and TIFF are accepted"
ALLOWED = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
LIMIT = 10**7

# PostScript that never ends: Ghostscript runs `{ } loop` forever, with no timeout.
WEDGING_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"


def saved(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _psd(width: int, height: int) -> bytes:
    """A minimal uncompressed RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    planes = np.zeros((3, height, width), dtype=np.uint8)
    planes[0] = 200
    planes[1, :, : width // 2] = 90
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + planes.tobytes()


def _picture(mode: str = "RGB") -> Image.Image:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8] = (200, 20, 20)
    pixels[:8, 8:] = (20, 20, 200)
    return Image.fromarray(pixels).convert(mode)


def refused_samples() -> dict[str, bytes]:
    """Real files in formats Pillow decodes but the service refuses."""
    return {
        "EPS": WEDGING_EPS,
        "EPS (Pillow's own)": saved(_picture(), "EPS"),
        "PSD": _psd(16, 8),
        "PCX": saved(_picture(), "PCX"),
        "TGA": saved(_picture(), "TGA"),
        "ICO": saved(_picture(), "ICO"),
        "SGI": saved(_picture(), "SGI"),
        "DDS": saved(_picture(), "DDS"),
        "ICNS": saved(_picture(), "ICNS"),
        "QOI": saved(_picture(), "QOI"),
        "PPM": saved(_picture(), "PPM"),
        "JPEG 2000": saved(_picture(), "JPEG2000"),
        "XBM": saved(_picture("1"), "XBM"),
        "MSP": saved(_picture("1"), "MSP"),
    }


# Which refused formats the message names (the rest are "unrecognised").
NAMED = {
    "EPS": "EPS",
    "EPS (Pillow's own)": "EPS",
    "PSD": "PSD",
    "PCX": "PCX",
    "TGA": "TGA",
    "ICO": "ICO",
    "SGI": "SGI",
    "DDS": "DDS",
    "ICNS": "ICNS",
    "QOI": "QOI",
    "PPM": "PNM",
    "JPEG 2000": "JPEG 2000",
}


def _in_thread(work: Callable[[], object], seconds: float) -> object:
    """`work()`'s result or exception, or AssertionError if it runs past `seconds` (a daemon
    thread, so a wedged decoder fails the test instead of hanging the run)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome[0]


# --- only six formats are opened ------------------------------------------------------------


def test_the_refused_samples_are_images_pillow_would_otherwise_decode() -> None:
    """Guards the test below: each sample (bar EPS, which needs Ghostscript) is a real file."""
    for name, data in refused_samples().items():
        if name.startswith("EPS"):
            assert Image.open(io.BytesIO(data)).format == "EPS"
            continue
        image = Image.open(io.BytesIO(data))
        image.load()
        assert image.format not in ALLOWED, name


def test_the_wedging_eps_is_refused_at_once_without_ghostscript(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append(args)
        time.sleep(3600)  # what the real one does with `{ } loop`

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    started = time.perf_counter()
    outcome = _in_thread(lambda: decode_image(WEDGING_EPS, "inputs[0]", LIMIT), seconds=5)
    assert time.perf_counter() - started < 1.0
    assert calls == []
    assert isinstance(outcome, InvalidArgumentError), outcome
    message = str(outcome)
    assert message.startswith("inputs[0]: unsupported image format (EPS")
    assert ACCEPTED in message


@pytest.mark.parametrize("name", list(refused_samples()))
def test_other_formats_are_refused_before_any_plugin_of_theirs_runs(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.init()
    opened: list[str] = []
    for fmt, (_factory, accept) in list(Image.OPEN.items()):
        if fmt not in ALLOWED:

            def spy(*args: object, fmt: str = fmt) -> Any:
                opened.append(fmt)
                raise SyntaxError("not for this test")

            monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    with pytest.raises(InvalidArgumentError) as refused:
        decode_image(refused_samples()[name], "examples[2].image", LIMIT)
    assert opened == []
    message = str(refused.value)
    assert message.startswith("examples[2].image: ")
    assert ACCEPTED in message
    if name in NAMED:
        assert f"unsupported image format ({NAMED[name]}" in message
    else:
        assert "unrecognised format or corrupt data" in message


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_the_six_accepted_formats_still_decode(fmt: str, options: dict[str, Any]) -> None:
    decoded = decode_image(saved(_picture(), fmt, **options), "x", LIMIT)
    assert decoded.mode == "RGB" and decoded.size == (16, 16)
    red, _, blue = np.asarray(decoded)[12, 2].astype(int)
    assert red > 150 and blue < 80


def test_an_animated_gif_decodes_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixel = np.asarray(decode_image(buffer.getvalue(), "x", LIMIT))[4, 4]
    assert pixel[0] > 200 and pixel[2] < 50


# --- 16-bit and float samples -----------------------------------------------------------------

RAMP = np.linspace(0, 65535, 512).round().astype(np.uint16)  # every 8-bit level, twice


def _gray(decoded: Image.Image) -> np.ndarray:
    pixels = np.asarray(decoded).astype(int)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0]


def _assert_keeps_the_ramp(decoded: Image.Image, expected: np.ndarray) -> None:
    row = _gray(decoded)[0]
    assert row.min() == 0 and row.max() == 255
    assert (np.diff(row) >= 0).all(), "the gradient is not monotonic"
    assert np.abs(row - expected.astype(int)).max() <= 1
    # Before the fix Pillow clipped at 255: all but the first 1/256 of the ramp was white.
    assert (row == 255).mean() < 0.01


def _png_16_bit(samples: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG by hand (Pillow writes 16-bit grayscale only)."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")]
)
def test_16_bit_grayscale_keeps_its_gradient(mode: str, fmt: str) -> None:
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    ramp = np.tile(RAMP, (4, 1))
    image = Image.frombytes(mode, (ramp.shape[1], ramp.shape[0]), ramp.astype(dtype).tobytes())
    data = saved(image, fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")  # what Pillow hands over
    _assert_keeps_the_ramp(decode_image(data, "x", LIMIT), RAMP >> 8)


@pytest.mark.parametrize(("colour_type", "channels"), [(0, 1), (2, 3), (4, 2), (6, 4)])
def test_16_bit_png_of_every_colour_type_keeps_its_gradient(
    colour_type: int, channels: int
) -> None:
    ramp = np.tile(RAMP, (4, 1))
    opaque = np.full_like(ramp, 65535)
    planes = {1: [ramp], 2: [ramp, opaque], 3: [ramp] * 3, 4: [ramp] * 3 + [opaque]}[channels]
    samples = np.stack(planes, axis=2) if channels > 1 else ramp
    _assert_keeps_the_ramp(decode_image(_png_16_bit(samples, colour_type), "x", LIMIT), RAMP >> 8)


def test_float_samples_are_read_on_the_0_to_1_scale() -> None:
    values = np.array([[-1.0, 0.0, 0.25, 0.5, 1.0, 7.0, np.nan, np.inf]], dtype=np.float32)
    data = saved(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    assert _gray(decode_image(data, "x", LIMIT))[0].tolist() == [0, 0, 64, 128, 255, 255, 0, 255]
    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (2, 1))
    _assert_keeps_the_ramp(
        decode_image(saved(Image.fromarray(ramp), "TIFF"), "x", LIMIT), np.arange(256)
    )


# --- EXIF orientation ---------------------------------------------------------------------------

# What each EXIF orientation asks a viewer to do to the stored pixels, written independently of
# Pillow's table: 6 = turn 90 degrees clockwise, 8 = counter-clockwise, 5 and 7 = mirror + turn.
UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: np.rot90(a[:, ::-1], k=-1),
    8: lambda a: np.rot90(a, k=1),
}


def _asymmetric(width: int = 64, height: int = 32) -> Image.Image:
    """Blocks of flat colour that no flip or turn maps onto themselves."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (240, 16, 16)
    pixels[: height // 2, width // 2 :] = (16, 16, 240)
    pixels[height // 2 :, width // 2 :] = (16, 240, 16)
    pixels[: height // 4, : width // 4] = (250, 250, 250)
    return Image.fromarray(pixels)


def _with_orientation(fmt: str, orientation: int, **options: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return saved(_asymmetric(), fmt, exif=exif.tobytes(), **options)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_turned_upright_by_its_exif_orientation(orientation: int) -> None:
    stored = np.asarray(decode_image(saved(_asymmetric(), "JPEG", quality=95), "x", LIMIT))
    decoded = decode_image(_with_orientation("JPEG", orientation, quality=95), "x", LIMIT)
    expected = UPRIGHT[orientation](stored)
    assert decoded.size == (expected.shape[1], expected.shape[0])
    assert np.array_equal(np.asarray(decoded), expected)  # same JPEG pixels, only turned


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("WEBP", {"lossless": True})])
def test_png_and_webp_are_turned_upright_too(fmt: str, options: dict[str, Any]) -> None:
    decoded = decode_image(_with_orientation(fmt, 6, **options), "x", LIMIT)
    assert decoded.size == (32, 64)
    assert np.array_equal(np.asarray(decoded), np.rot90(np.asarray(_asymmetric()), k=-1))


def test_a_tiff_is_turned_once_not_twice() -> None:
    # Pillow's TIFF reader applies the orientation itself; the decoder must not repeat it.
    data = saved(_asymmetric(), "TIFF", tiffinfo={0x0112: 6})
    decoded = decode_image(data, "x", LIMIT)
    assert np.array_equal(np.asarray(decoded), np.rot90(np.asarray(_asymmetric()), k=-1))


def test_orientation_applies_to_a_jpeg_decoded_at_a_reduced_scale() -> None:
    big = _asymmetric(1600, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = saved(big, "JPEG", quality=95, exif=exif.tobytes())
    reduced = decode_image(data, "x", LIMIT, at_least=48)
    assert reduced.size == (100, 200)  # 1/8 scale of 800 x 1600
    loaded = ImagePreprocessor(48, (0.5,) * 3, (0.5,) * 3, "bicubic", LIMIT).load(
        ModelInput(image=data), "x"
    )
    # Upright, the left half of the picture (red in storage) is now the top.
    assert int(loaded[0, 2, 24]) > 200 and int(loaded[2, 2, 24]) < 60


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00II*\x00" + bytes(range(64)),  # an IFD offset past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x04abc\x00",
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x63\x00",
    ],
)
def test_broken_or_odd_exif_leaves_the_picture_as_stored(exif: bytes) -> None:
    data = saved(_asymmetric(), "JPEG", quality=95, exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow says "Corrupt EXIF data"; that is the point
        decoded = decode_image(data, "x", LIMIT)
    assert decoded.size == (64, 32)


# --- through the real server ----------------------------------------------------------------------


def test_an_eps_sent_to_predict_is_invalid_argument_and_the_server_keeps_serving(
    server: RunningServer, stub: pb_grpc.TransferServiceStub, image_head: str
) -> None:
    inputs = [pb.Input(image=probe_images(1)[0]), pb.Input(image=WEDGING_EPS)]
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Predict(pb.PredictRequest(head_id=image_head, inputs=inputs), timeout=30)
    assert time.perf_counter() - started < 10
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert "inputs[1]" in details and "unsupported image format (EPS" in details
    assert ACCEPTED in details
    assert_serving(server.address, stub, image_head)
