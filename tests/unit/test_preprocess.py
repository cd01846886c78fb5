"""Any common image format, size and colour mode becomes what the backbone expects."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.backbones.preprocess import (
    ImagePreprocessor,
    augment_image,
    check_image,
    decode_image,
)
from service.domain import ModelInput
from service.errors import InvalidArgumentError, ResourceExhaustedError

PREPROCESSOR = ImagePreprocessor(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 10**7)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "size", "fmt"),
    [
        ("L", (28, 28), "PNG"),
        ("RGB", (300, 120), "JPEG"),
        ("L", (800, 600), "JPEG"),  # decoded at a reduced scale, still grayscale
        ("CMYK", (400, 400), "JPEG"),
        ("RGBA", (50, 70), "PNG"),
        ("P", (33, 33), "GIF"),
        ("RGB", (64, 64), "WEBP"),
        ("I;16", (40, 20), "PNG"),
        ("1", (17, 90), "BMP"),
    ],
)
def test_any_image_becomes_an_rgb_square(mode: str, size: tuple[int, int], fmt: str) -> None:
    image = Image.new(mode, size)
    loaded = PREPROCESSOR.load(ModelInput(image=encode(image, fmt)), "inputs[0]")
    assert loaded.shape == (3, 48, 48) and loaded.dtype == torch.uint8
    [normalized] = PREPROCESSOR.finish([loaded], None)
    assert normalized.dtype == torch.float32
    assert float(normalized.min()) >= -1.0 and float(normalized.max()) <= 1.0


def test_grayscale_is_replicated_to_three_channels() -> None:
    pixels = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    loaded = PREPROCESSOR.load(ModelInput(image=encode(Image.fromarray(pixels), "PNG")), "x")
    assert torch.equal(loaded[0], loaded[1]) and torch.equal(loaded[1], loaded[2])


def test_transparent_pixels_become_white_not_black() -> None:
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    loaded = PREPROCESSOR.load(ModelInput(image=encode(image, "PNG")), "x")
    assert int(loaded.min()) == 255


def test_undecodable_bytes_name_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match=r"examples\[3\]"):
        decode_image(b"definitely not an image", "examples[3]", 10**7)
    with pytest.raises(InvalidArgumentError, match="empty"):
        decode_image(b"", "inputs[0]", 10**7)


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(Image.new("1", (5000, 5000)), "PNG")  # small file, 25 Mpx declared
    assert len(big) < 100_000
    with pytest.raises(ResourceExhaustedError, match="5000x5000"):
        decode_image(big, "inputs[0]", 10_000_000)


def test_text_given_to_an_image_preprocessor_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="expected an image"):
        PREPROCESSOR.load(ModelInput(text="hello"), "inputs[0]")


def test_augmentation_is_seeded_and_changes_pixels() -> None:
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    first = augment_image(image, torch.Generator().manual_seed(1))
    again = augment_image(image, torch.Generator().manual_seed(1))
    other = augment_image(image, torch.Generator().manual_seed(2))
    assert first.shape == image.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def _photo(width: int, height: int, quality: int = 90) -> bytes:
    """A smooth colour JPEG: gradients plus a few shapes, like a camera picture's low end."""
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    red = 255 * xs * np.ones_like(ys)
    green = 255 * ys * np.ones_like(xs)
    blue = 127 + 127 * np.sin(12 * xs) * np.cos(9 * ys)
    pixels = np.stack([red, green, blue], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_the_input_size() -> None:
    photo = _photo(2000, 1500)
    assert decode_image(photo, "x", 10**7).size == (2000, 1500)
    reduced = decode_image(photo, "x", 10**7, at_least=48)
    assert reduced.size == (250, 188)  # 1/8: the largest step that keeps both sides >= 48
    assert decode_image(photo, "x", 10**7, at_least=400).size == (1000, 750)  # 1/4: 375 < 400
    # The model sees nearly the same picture as from a full decode (same crop, same resize).
    full = Image.open(io.BytesIO(photo)).convert("RGB")
    expected = np.asarray(full.resize((48, 48), Image.Resampling.BICUBIC, box=(250, 0, 1750, 1500)))
    loaded = PREPROCESSOR.load(ModelInput(image=photo), "x").permute(1, 2, 0).numpy()
    difference = np.abs(loaded.astype(np.int16) - expected.astype(np.int16))
    assert float(difference.mean()) < 2.0 and int(difference.max()) < 24


def test_the_cheapest_check_still_refuses_a_truncated_jpeg() -> None:
    photo = _photo(2000, 1500)
    with pytest.raises(InvalidArgumentError, match=r"examples\[0\]\.image"):
        check_image(photo[: len(photo) * 2 // 3], "examples[0].image", 10**7)
