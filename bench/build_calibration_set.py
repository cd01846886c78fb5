"""Writes the precision-calibration images shipped in service/transfer_service/calibration/.

30 Fashion-MNIST test-split images (3 per class, fixed seed) from the Debian package
dataset-fashion-mnist (Zalando SE, MIT/Expat licence), as 28x28 grayscale PNGs. The texts
beside them (texts.txt) are this project's own, written for the set, not copied. Run once:
    PYTHONPATH=. .venv/bin/python bench/build_calibration_set.py
"""

from __future__ import annotations

from pathlib import Path

from tests.datasets import fashion_mnist

TARGET = Path(__file__).resolve().parents[1] / "service" / "transfer_service" / "calibration"


def main() -> None:
    images = TARGET / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index, (png, label) in enumerate(fashion_mnist(3, split="test", seed=20)):
        (images / f"{index:02d}-{label}.png").write_bytes(png)


if __name__ == "__main__":
    main()
