"""Any common image format, size and colour mode becomes what the backbone expects; a text's
token ids are those of the whole text, however long, at the cost of a prefix."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transfer_service.backbones.preprocess import (
    ImagePreprocessor,
    TextPreprocessor,
    augment_image,
    check_image,
    decode_image,
)
from transfer_service.domain import ModelInput
from transfer_service.errors import InvalidArgumentError, ResourceExhaustedError

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


# --- texts: tokenised from a prefix, with the whole text's ids ----------------------------------


class CountingTokenizer:
    """The real tokenizer, counting the characters it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.characters = 0

    def __call__(self, text: str, **options: Any) -> Any:
        self.characters += len(text)
        return self.tokenizer(text, **options)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transfer_service.backbones.catalog import MiniLmSpec
    from transformers import AutoTokenizer

    weights = MiniLmSpec().locate_weights(Path("/unused"))
    return AutoTokenizer.from_pretrained(weights, local_files_only=True)


# Words whose pieces change when cut short, punctuation that splits words, accents and combining
# marks (stripped), CJK (one token a character), a final-sigma word, a ligature, emoji, control
# and zero-width characters (dropped), and every kind of whitespace.
VOCABULARY = [
    "the", "unbelievable", "tokenisation", "don't", "e-mail", "U.S.A.", "(x)", "[1]", "...",
    "naïve", "Ünïcode", "cafe\u0301", "\u0301", "東京", "日本語の", "ΟΔΟΣ", "ﬁne", "😀", "🇫🇷",
    "\x00", "\x01", "\u200b", "\ufeff", "\u00a0", "\u3000", "\t", "\n\n", "\r\n", "\u2028",
    "\x1c", "a" * 101, "x" * 99, "12,345.67", "$", "¿qué?", "«»", "—", "‿",
]  # fmt: skip


def _random_text(rng: random.Random, words: int) -> str:
    picked = []
    for _ in range(words):
        word = rng.choice(VOCABULARY)
        picked.append(word + rng.choice(["", " ", " ", " ", "  ", ",", "\n"]))
    return "".join(picked)


def _cut_mid_word(max_tokens: int, word: str, into: int) -> str:
    """A text whose first prefix (8 characters a token) ends `into` characters into `word`,
    just where the tokens reach the limit: the cut word's pieces ("un", "##bel" for "unbel",
    not "unbelievable"; "xx", "##xx" for a long word that is [UNK] whole) would land in the
    kept window if the cut word were trusted. Dropped control characters pad the gap."""
    head = "a " * (max_tokens - 3)
    pad = "\x01" * (8 * max_tokens - into - len(head))
    return head + pad + word + " " + "tail " * (4 * max_tokens)


def _expected(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"])


@pytest.mark.parametrize("max_tokens", [8, 64, 256, 512])
def test_a_cut_text_has_exactly_the_whole_texts_ids(tokenizer: Any, max_tokens: int) -> None:
    rng = random.Random(max_tokens)
    texts = [_random_text(rng, rng.randint(4 * max_tokens, 20 * max_tokens)) for _ in range(40)]
    texts += [
        "z" * 5000 + " " + _random_text(rng, 3000),  # one 5,000-character word first
        _random_text(rng, 2000) + "y" * 5000,  # ... and last
        _random_text(rng, 2000) + "w" * 5000 + _random_text(rng, 2000),  # ... in the middle
        "word " + " " * 60_000,  # a whitespace-only tail
        _random_text(rng, 500) + " \t\n\r\u00a0\u3000" * 20_000,
        "unbelievable" * 8000,  # no break anywhere: every cut lands mid-word
        "unbelievable " * 8000,
        "東" * 40_000,
        "!" * 40_000,
        "😀" * 40_000,
        "\x01" * 40_000 + " the end",
        "e\u0301" * 20_000 + " tail",
    ]
    texts += [_cut_mid_word(max_tokens, "unbelievable", into) for into in range(1, 12)]
    texts += [_cut_mid_word(max_tokens, "x" * 150, into) for into in (1, 50, 99, 100, 101, 149)]
    for text in texts:
        assert len(text) >= 2 * 8 * max_tokens  # long enough that a prefix is tried first
        preprocessor = TextPreprocessor(tokenizer, max_tokens)
        assert preprocessor.token_ids(text) == _expected(tokenizer, text, max_tokens), text[:80]


def test_load_returns_the_ids_as_a_text_state(tokenizer: Any) -> None:
    text = _random_text(random.Random(5), 20_000)
    state = TextPreprocessor(tokenizer, 256).load(ModelInput(text=text), "inputs[0]")
    assert state.values.tolist() == _expected(tokenizer, text, 256)
    assert state.mask.tolist() == [1] * 256
    with pytest.raises(InvalidArgumentError, match=r"inputs\[2\]: text is empty"):
        TextPreprocessor(tokenizer, 256).load(ModelInput(text=" \n\t "), "inputs[2]")


def test_a_long_text_costs_a_prefix_not_the_whole_text(tokenizer: Any) -> None:
    text = _random_text(random.Random(7), 40_000)[:120_000]
    assert len(text) == 120_000
    counting = CountingTokenizer(tokenizer)
    preprocessor = TextPreprocessor(counting, 256)
    assert preprocessor.token_ids(text) == _expected(tokenizer, text, 256)
    assert counting.characters <= 8 * 256 * 2  # the first prefix, or at most one doubling

    def best_of_three(work: Callable[[], object]) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return min(times)

    whole = best_of_three(lambda: tokenizer(text, truncation=True, max_length=256))
    cut = best_of_three(lambda: TextPreprocessor(tokenizer, 256).token_ids(text))
    assert whole > 5 * cut, f"whole {whole * 1000:.1f} ms, cut {cut * 1000:.1f} ms"


@pytest.mark.parametrize(
    "text",
    ["a" * 120_000, "😀" * 120_000, "hi" + " " * 120_000, "\x01" * 120_000 + " x"],
)
def test_a_text_with_few_tokens_costs_at_most_twice_its_whole_tokenisation(
    tokenizer: Any, text: str
) -> None:
    counting = CountingTokenizer(tokenizer)
    assert TextPreprocessor(counting, 256).token_ids(text) == _expected(tokenizer, text, 256)
    assert counting.characters < 2 * len(text)
