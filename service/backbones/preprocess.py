"""Turns raw inputs into what a backbone's first stage expects.

Images: any format Pillow decodes, any size or mode -> RGB, shorter side resized to the input
size, centre-cropped square, kept as uint8 [3, S, S] until `normalize` (cheap to cache and to
augment). Texts: tokenised and truncated; padding happens at batch time (trunks.collate).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvf

from service.backbones.trunks import TextState
from service.domain import ModelInput
from service.errors import InvalidArgumentError, ResourceExhaustedError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class Preprocessor(Protocol):
    @property
    def input_size(self) -> int:
        """Image side in pixels, or maximum tokens."""

    def load(self, model_input: ModelInput, field: str) -> Any:
        """Decodes/tokenises one input; raises InvalidArgumentError naming `field`."""

    def finish(self, loaded: Sequence[Any], generator: torch.Generator | None) -> list[Any]:
        """Loaded examples -> first-stage inputs; a generator turns on augmentation."""

    def resized(self, input_size: int) -> Preprocessor:
        """The same preprocessing at another input size (a head trained at that size)."""


@dataclass(frozen=True, slots=True)
class ImagePreprocessor:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    max_pixels: int

    def resized(self, input_size: int) -> ImagePreprocessor:
        return dataclasses.replace(self, input_size=input_size)

    def load(self, model_input: ModelInput, field: str) -> torch.Tensor:
        if model_input.image is None:
            raise InvalidArgumentError(f"{field}: expected an image, got text")
        side = self.input_size
        image = decode_image(model_input.image, field, self.max_pixels, at_least=side)
        width, height = image.size
        # Centre square of the source, resized straight to S x S: the same picture as
        # "shorter side to S, then centre-crop", without ever resizing the long side (a
        # 1 x 20000 image would otherwise become 64 x 1280000 pixels first).
        square = min(width, height)
        left = (width - square) // 2
        top = (height - square) // 2
        cropped = image.resize(
            (side, side),
            _RESAMPLE[self.interpolation],
            box=(left, top, left + square, top + square),
        )
        array = np.asarray(cropped, dtype=np.uint8)  # [S, S, 3]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # [3, S, S]

    def finish(
        self, loaded: Sequence[torch.Tensor], generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        out = []
        for image in loaded:
            if generator is not None:
                image = augment_image(image, generator)
            out.append((image.float() / 255.0 - mean) / std)
        return out


def decode_image(
    data: bytes, field: str, max_pixels: int, *, at_least: int | None = None
) -> Image.Image:
    """The image as RGB; raises InvalidArgumentError (or ResourceExhaustedError for too many
    pixels) naming `field`. With `at_least`, a JPEG may decode at 1/2, 1/4 or 1/8 scale while
    both sides stay at least that many pixels: libjpeg then skips most of the inverse DCT
    (a 12-megapixel photo for a 224-pixel model decodes at 1/8). Every coefficient is still
    read, so truncated or corrupt data fails the same way (see `check_image`)."""
    if not data:
        raise InvalidArgumentError(f"{field}: image is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit raises) on huge images; we check first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except Image.DecompressionBombError as exc:
                raise ResourceExhaustedError(f"{field}: image is too large ({exc})") from exc
            width, height = image.size  # from the header, before any pixel is decoded
            if width * height > max_pixels:
                raise ResourceExhaustedError(
                    f"{field}: image is {width}x{height} pixels, over the limit of {max_pixels}"
                )
            if at_least is not None:
                image.draft("RGB", (at_least, at_least))  # a no-op for formats other than JPEG
            image.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        if isinstance(exc, UnidentifiedImageError):
            # Pillow's message names its internal file object (<_io.BytesIO object at 0x...>).
            reason = "unrecognised or corrupt image data; PNG, JPEG, WebP, GIF, BMP and TIFF decode"
        else:
            reason = str(exc)
        raise InvalidArgumentError(f"{field}: not a decodable image ({reason})") from exc
    if image.width < 1 or image.height < 1:
        raise InvalidArgumentError(f"{field}: image has no pixels")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def check_image(data: bytes, field: str, max_pixels: int) -> None:
    """Raises what `decode_image` would for this image, at the least cost: a complete decode
    at the smallest scale (1/8 for a JPEG), for checks made before a job decodes it again."""
    decode_image(data, field, max_pixels, at_least=1)


def augment_image(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1), horizontal flip, brightness/contrast jitter.

    image: uint8 [3, S, S] -> uint8 [3, S, S]; all randomness from `generator`.
    """
    side = image.shape[-1]
    scale = 0.6 + 0.4 * float(torch.rand((), generator=generator))
    crop = max(8, round(side * scale**0.5))
    top = int(torch.randint(0, side - crop + 1, (), generator=generator))
    left = int(torch.randint(0, side - crop + 1, (), generator=generator))
    out = tvf.resized_crop(image, top, left, crop, crop, [side, side], antialias=True)
    if float(torch.rand((), generator=generator)) < 0.5:
        out = tvf.horizontal_flip(out)
    brightness = 0.8 + 0.4 * float(torch.rand((), generator=generator))
    contrast = 0.8 + 0.4 * float(torch.rand((), generator=generator))
    out = tvf.adjust_brightness(out, brightness)
    adjusted: torch.Tensor = tvf.adjust_contrast(out, contrast)
    return adjusted


class TextPreprocessor:
    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self._tokenizer = tokenizer
        self.input_size = max_tokens

    def resized(self, input_size: int) -> TextPreprocessor:
        return TextPreprocessor(self._tokenizer, input_size)

    def load(self, model_input: ModelInput, field: str) -> TextState:
        if model_input.text is None:
            raise InvalidArgumentError(f"{field}: expected text, got an image")
        if not model_input.text.strip():
            raise InvalidArgumentError(f"{field}: text is empty")
        ids = self._tokenizer(model_input.text, truncation=True, max_length=self.input_size)[
            "input_ids"
        ]
        values = torch.tensor(ids, dtype=torch.long)  # [L]
        return TextState(values, torch.ones_like(values))

    def finish(
        self, loaded: Sequence[TextState], generator: torch.Generator | None
    ) -> list[TextState]:
        # Text augmentation is off by design: token edits change meaning more than pixels do.
        return list(loaded)
