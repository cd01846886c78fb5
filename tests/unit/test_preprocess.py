"""Any common image format, size and colour mode becomes what the backbone expects."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.backbones.preprocess import ImagePreprocessor, augment_image, decode_image
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
