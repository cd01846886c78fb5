"""Turns raw inputs into what a backbone's first stage expects.

Images: JPEG, PNG, WebP, GIF (first frame), BMP and TIFF only; any other format, even one
Pillow knows, is refused before its plugin runs (EPS would run Ghostscript, with no timeout,
on the compute thread). Any size or mode -> EXIF orientation applied -> RGB (16-bit and float
samples scaled, not clipped), shorter side resized to the input size, centre-cropped square,
kept as uint8 [3, S, S] until `normalize` (cheap to cache and to augment). Texts: tokenised
from a prefix long enough to fill the token limit (a 120 KB text costs what its first few KB
do), with exactly the ids the whole text would give, cut at the limit; padding happens at
batch time (trunks.collate).
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as tvf

from transfer_service.backbones.trunks import TextState
from transfer_service.domain import ModelInput
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# The only Pillow plugins that ever see request bytes: each decodes in-process with a bounded
# cost per pixel. Everything else Pillow knows is refused unread: EPS runs Ghostscript (a
# 60-byte `{ } loop` never returns), and the rest (PSD, PCX, TGA, ICO, SGI, DDS, ...) are
# rarely-used parsers that no client of this service needs.
_ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED = "JPEG, PNG, WebP, GIF, BMP and TIFF are accepted"

# The leading bytes each allowed plugin accepts (Pillow's own `_accept` checks, copied so that
# bytes of any other format are refused by a few comparisons, before Pillow, a thread hop or
# any copy; a test holds them to Pillow's). WebP is RIFF....WEBP, checked apart.
_ALLOWED_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"MM\x00*",  # TIFF, then BigTIFF, both byte orders
    b"II*\x00",
    b"MM*\x00",
    b"II\x00*",
    b"MM\x00+",
    b"II+\x00",
)

# Leading bytes of formats that are refused, only to say which one it was: matched here, by
# hand, because asking Pillow would run that format's plugin.
_REFUSED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%!PS", "EPS/PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"DDS ", "DDS"),
    (b"\x01\xda", "SGI"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"SIMPLE  =", "FITS"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG/XML"),
)

# EXIF orientation -> the transpose that shows the picture upright (Pillow's ImageOps table).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# A text prefix of this many characters per token usually holds the token limit (English runs
# at 4-5 characters per wordpiece); when it does not, the prefix doubles.
_CHARS_PER_TOKEN = 8
# Whitespace that every BERT tokenizer reads as a word break and drops (see TextPreprocessor).
_WHITESPACE_RUN = re.compile(r"[ \t\n\r]{2,}")


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
            raise InvalidArgumentError(f"{field}: expected an image, got text", field=field)
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
    """The image as RGB, turned upright by its EXIF orientation; raises InvalidArgumentError
    (or ResourceExhaustedError for too many pixels) naming `field`. Only JPEG, PNG, WebP,
    GIF (first frame), BMP and TIFF are opened. With `at_least`, a JPEG may decode at 1/2,
    1/4 or 1/8 scale while both sides stay at least that many pixels: libjpeg then skips
    most of the inverse DCT (a 12-megapixel photo for a 224-pixel model decodes at 1/8).
    Every coefficient is still read, so truncated or corrupt data fails the same way (see
    `check_image`)."""
    check_image_format(data, field)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x its own limit raises) on huge images; we check first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS)
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
    except UnidentifiedImageError as exc:
        # Pillow's message names its internal file object (<_io.BytesIO object at 0x...>).
        raise _unrecognised(field) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidArgumentError(f"{field}: not a decodable image ({exc})", field=field) from exc
    if image.width < 1 or image.height < 1:
        raise InvalidArgumentError(f"{field}: image has no pixels", field=field)
    turn = _orientation(image)  # read before the conversions below, which drop the EXIF
    rgb = _to_rgb(image, field)
    return rgb if turn is None else rgb.transpose(turn)


def check_image_format(data: bytes, field: str) -> None:
    """Raises InvalidArgumentError naming `field` unless `data` starts like one of the allowed
    formats: a few byte comparisons, no decoding and no copy of `data`, so a request of
    refused bytes is refused before any other work (bench/noisy_neighbour.py, eps)."""
    if not data:
        raise InvalidArgumentError(f"{field}: image is empty", field=field)
    if data.startswith(_ALLOWED_SIGNATURES) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP"):
        return
    refused = _refused_format(data)
    if refused is not None:
        raise InvalidArgumentError(
            f"{field}: unsupported image format ({refused}); {_ACCEPTED}", field=field
        )
    raise _unrecognised(field)


def _unrecognised(field: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{field}: not a decodable image (unrecognised format or corrupt data; {_ACCEPTED})",
        field=field,
    )


def _to_rgb(image: Image.Image, field: str) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white rather than letting it turn black.
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    try:
        return image.convert("RGB")
    except ValueError as exc:  # a colour mode Pillow reads but cannot convert
        raise InvalidArgumentError(
            f"{field}: unsupported colour mode {image.mode!r} ({exc})", field=field
        ) from exc


def _refused_format(data: bytes) -> str | None:
    """The name of a known, refused format these bytes start with (or end with, for TGA)."""
    if data.endswith(b"TRUEVISION-XFILE.\x00"):  # first: a TGA header can start like a CUR
        return "TGA"
    for signature, name in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if len(data) >= 3 and data[0] == 0x0A and data[1] in (0, 2, 3, 4, 5) and data[2] == 1:
        return "PCX"
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM"
    return None


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The transpose that turns the image as its EXIF orientation says (cameras store pixels
    as the sensor saw them and record the rotation; every viewer shows them turned), or None.
    """
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error):
        # Unreadable EXIF is not an unreadable picture: show it as stored, as browsers do.
        return None
    return _ORIENTATION.get(orientation) if isinstance(orientation, int) else None


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale -> "L", scaled rather than clipped (Pillow's
    own conversion clips at 255, which turns all but the darkest 1/256 of a 16-bit range
    white). Integers are read on the 16-bit scale (value >> 8, negatives as 0), which is
    what 16-bit PNG and TIFF mean and how Pillow hands them over (modes "I;16*", or "I");
    floats on the [0, 1] scale of float image files (x 255, outside clipped, NaN as 0), a
    fixed rule so that a dim picture stays dim rather than being stretched to full range."""
    samples = np.asarray(image)
    if image.mode == "F":
        scaled = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=0.0)
        eight_bit = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        eight_bit = (np.clip(samples.astype(np.int32), 0, 65535) >> 8).astype(np.uint8)
    return Image.fromarray(eight_bit)  # uint8 [H, W] -> mode "L"


def declared_pixels(data: bytes) -> int:
    """Width x height from an accepted image's header, without decoding a pixel (tens of
    microseconds); 0 when the header cannot be read (decoding then reports why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as image:
                width, height = image.size
    except Exception:  # any failure here is decode_image's to report, with its message
        return 0
    return width * height


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
    """Texts -> token ids, cut at `input_size` tokens.

    A long text is tokenised from a prefix, not whole: the tokenizer's cost grows with the
    characters it reads (0.1-0.2 s for 120 KB; 512 such texts held Predict's compute thread
    for 55 s), while the ids kept need only the first few KB. The prefix gives exactly
    the whole text's ids because the tokenizer (MiniLM's is BERT's) works word by word:
    it normalises character by character, splits words at whitespace and punctuation, then
    splits each word into wordpieces on its own. So every word of a prefix except its last
    is a word of the whole text, with the same wordpieces; only the last one may have been
    cut (the pieces of "unbelievab" are not those of "unbelievable"; a word over 100
    characters is [UNK] whole but not when cut short). Once the tokens of the prefix's
    words before its last fill the limit, they are the whole text's first tokens and the
    truncated ids are equal. Otherwise the prefix doubles; past half the text, the whole
    text is tokenised, so no text costs more than twice its whole tokenisation.

    Runs of spaces, tabs and line breaks are read as one space, which changes no token (the
    tokenizer drops whitespace between words) but keeps whitespace padding from costing
    tokenizer time. Both shortcuts rest on that BERT-style tokenizer (a fast one: the word
    of each token comes from `word_ids`); tests/unit/test_preprocess.py checks them against
    whole-text tokenisation with the real MiniLM tokenizer.
    """

    def __init__(self, tokenizer: Any, max_tokens: int, lock: threading.Lock | None = None) -> None:
        self._tokenizer = tokenizer
        # A HF fast tokenizer keeps its truncation setting between calls (each call sets it,
        # then encodes), and every thread shares this one: unlocked, another thread's
        # untruncated prefix call could land in between and let a text through whole (765
        # tokens into MiniLM's 512 positions: INTERNAL under 4 concurrent text callers on a
        # busy CPU, tests/grpc/test_compiled_swap.py).
        self._tokenizer_lock = lock or threading.Lock()
        self.input_size = max_tokens

    def resized(self, input_size: int) -> TextPreprocessor:
        return TextPreprocessor(self._tokenizer, input_size, self._tokenizer_lock)

    def load(self, model_input: ModelInput, field: str) -> TextState:
        if model_input.text is None:
            raise InvalidArgumentError(f"{field}: expected text, got an image", field=field)
        if not model_input.text.strip():
            raise InvalidArgumentError(f"{field}: text is empty", field=field)
        values = torch.tensor(self.token_ids(model_input.text), dtype=torch.long)  # [L]
        return TextState(values, torch.ones_like(values))

    def token_ids(self, text: str) -> list[int]:
        """The ids of `text` tokenised whole and truncated to `input_size` tokens, at the cost
        of tokenising a prefix (see the class docstring)."""
        length = self.input_size * _CHARS_PER_TOKEN
        while 2 * length <= len(text):
            ids = self._ids_of_whole_words(text[:length])
            if ids is not None:
                return ids
            length *= 2
        with self._tokenizer_lock:
            encoded = self._tokenizer(
                _WHITESPACE_RUN.sub(" ", text), truncation=True, max_length=self.input_size
            )
        return list(encoded["input_ids"])

    def _ids_of_whole_words(self, prefix: str) -> list[int] | None:
        """The truncated ids, if the words of `prefix` before its last fill `input_size`."""
        # verbose=False: no warning that the prefix exceeds the model's length; cut below.
        with self._tokenizer_lock:
            encoded = self._tokenizer(_WHITESPACE_RUN.sub(" ", prefix), verbose=False)
        ids = list(encoded["input_ids"])
        words = encoded.word_ids()  # word index per token; None for [CLS] and [SEP]
        content = [i for i, word in enumerate(words) if word is not None]
        if not content or content != list(range(content[0], content[-1] + 1)):
            return None  # not "specials, text, specials": leave it to the whole-text path
        first, last = content[0], content[-1]
        room = self.input_size - (len(ids) - len(content))  # what truncation keeps of the text
        whole = sum(1 for i in content if words[i] != words[last])  # before the last word
        if whole < room:
            return None
        return ids[:first] + ids[first : first + room] + ids[last + 1 :]

    def finish(
        self, loaded: Sequence[TextState], generator: torch.Generator | None
    ) -> list[TextState]:
        # Text augmentation is off by design: token edits change meaning more than pixels do.
        return list(loaded)
