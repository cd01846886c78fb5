"""Corpora of hostile values: strings for ids, names, labels and texts; image bytes that are
empty, random, truncated, bombs or odd but valid; numbers at and past every limit.
Shared by the hostile-input table test and the fuzzer's strategies."""

from __future__ import annotations

import functools
import math

from PIL import Image

from tests.datasets import fashion_mnist
from tools.reliability.common import (
    bomb_png,
    encoded,
    gif_with_header,
    png,
    png_with_header,
    random_bytes,
)

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = 3.4028234663852886e38

# Strings that must never be taken for a path, URL, command or id they are not.
HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    " ",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "..%2f..%2fetc",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "C:\\Windows\\system32",
    "https://example.com/model.pt",
    "file:///etc/passwd",
    "s3://bucket/weights.bin",
    "hf://sentence-transformers/all-MiniLM-L6-v2",
    "UPPER",
    "-leading-dash",
    "_leading_underscore",
    "a b",
    "héad",
    "猫",
    "🙂",
    "a\x00b",
    "\x00",
    "\n",
    "a\tb\rc",
    "\x1b[31mred",
    "\u202eevil",
    "\ufeffbom",
    "\u200b",
    "x" * 65,
    "x" * 2000,
    "a;rm -rf /",
    "' OR 1=1 --",
    "${jndi:ldap://127.0.0.1/a}",
    "{{7*7}}",
    "%s%s%n",
    "NaN",
    "null",
)

# Texts for a text head: empty, blank, control, huge, exotic scripts.
HOSTILE_TEXTS: tuple[str, ...] = (
    "",
    " ",
    "\t\n\r",
    "\u3000\u00a0",
    "\u200b\u200b",
    "\x00",
    "\x00" * 64,
    "\x07\x08\x1b",
    "🙂" * 300,
    "\u202eright to left",
    "<script>alert(1)</script>",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "مرحبا بالعالم",
    "e\u0301" * 200,
    "word " * 4000,
)

# Labels: any non-blank string is a label; blank ones are refused.
HOSTILE_LABELS: tuple[str, ...] = (
    "",
    " ",
    "\t",
    "猫",
    "🙂",
    "a\x00b",
    "\n",
    "\u202e",
    "x" * 1000,
    "../x",
)

NUMBERS_INT32 = (0, 1, -1, 2, INT32_MAX, INT32_MIN, 1000, -1000)
NUMBERS_UINT32 = (0, 1, 2, 3, 1000, 1001, 4096, 4097, UINT32_MAX)
NUMBERS_UINT64 = (0, 1, 2**32, 2**63, UINT64_MAX)
NUMBERS_FLOAT = (
    0.0,
    -0.0,
    1e-45,
    1e-3,
    0.5,
    0.999,
    1.0,
    1.5,
    -1.0,
    FLOAT32_MAX,
    -FLOAT32_MAX,
    math.inf,
    -math.inf,
    math.nan,
)


@functools.cache
def good_images() -> tuple[bytes, ...]:
    """Real images in several formats and modes: all must be accepted."""
    real = [image for image, _ in fashion_mnist(2, split="test", classes=2, seed=11)]
    colour = Image.new("RGB", (40, 30), (200, 30, 30))
    rgba = Image.new("RGBA", (16, 16), (0, 128, 255, 100))
    palette = Image.new("P", (20, 20), 3)
    palette.info["transparency"] = 3
    wide16 = Image.new("I;16", (12, 12), 40000)
    cmyk = Image.new("CMYK", (20, 20), (0, 100, 200, 0))
    return (
        *real,
        png(1, 1),
        png(3, 5, mode="RGB", seed=2),
        encoded(colour, "JPEG", quality=70),
        encoded(rgba, "PNG"),
        encoded(palette, "PNG"),
        encoded(palette, "GIF"),
        encoded(wide16, "PNG"),
        encoded(cmyk, "JPEG"),
        encoded(colour, "BMP"),
        encoded(colour, "WEBP"),
        encoded(colour, "TIFF"),
    )


@functools.cache
def bad_images() -> tuple[bytes, ...]:
    """Bytes that are not a decodable image (INVALID_ARGUMENT) or declare too many pixels
    (RESOURCE_EXHAUSTED). Extreme aspect ratios are left to their own test."""
    good = good_images()[0]
    jpeg = good_images()[4]
    return (
        b"",
        b"\x00",
        random_bytes(64, 1),
        random_bytes(4096, 2),
        good[: len(good) // 2],
        good[:8],
        good[:33],
        jpeg[: len(jpeg) // 2],
        b"\x89PNG\r\n\x1a\n" + random_bytes(200, 3),
        b"\xff\xd8\xff" + random_bytes(200, 4),
        b"GIF89a" + random_bytes(50, 5),
        b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>",
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
        b"PK\x03\x04" + random_bytes(100, 6),
        png_with_header(0, 0),
        png_with_header(0, 10),
        bomb_png(30000, 30000),
        gif_with_header(65535, 65535),
        png_with_header(INT32_MAX, INT32_MAX),
    )
