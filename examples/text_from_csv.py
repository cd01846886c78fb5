"""Fine-tune a text classifier from a CSV file with `text` and `label` columns, then predict.

    TRANSFER_TARGET=localhost:50051 python examples/text_from_csv.py reviews.csv \
        --predict "The battery died after a week" "Works as described"
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

from transfer_client import TransferClient


def labelled_texts(path: Path) -> list[tuple[str, str]]:
    """(text, label) per row; the csv module reads quoted commas and newlines in a text."""
    with path.open(newline="", encoding="utf-8") as file:
        return [(row["text"], row["label"]) for row in csv.DictReader(file)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path, help="a CSV with text and label columns")
    parser.add_argument("--backbone", default="minilm_l6")
    parser.add_argument("--predict", nargs="*", default=[], help="texts to classify")
    args = parser.parse_args()

    examples = labelled_texts(args.csv)
    print(f"{len(examples)} texts of {len({label for _, label in examples})} classes")

    target = os.environ.get("TRANSFER_TARGET", "localhost:50051")
    with TransferClient(target, timeout=120) as client:
        # The default solver for a linear head on frozen features: L2-regularised logistic
        # regression, its strength C chosen by cross-validation (no validation split needed).
        done = client.train(args.backbone, examples, head_name="text-example")
        metrics = done.metrics
        chosen = metrics.regularization_c
        print(
            f"head {done.head_id}: cross-validated accuracy "
            f"{metrics.validation_accuracy or 0:.1%} "
            f"(majority baseline {metrics.majority_baseline_accuracy or 0:.1%})"
            + (f", C={chosen:.3g}" if chosen is not None else "")
        )
        if args.predict:
            for text, prediction in zip(
                args.predict, client.predict(done.head_id, args.predict, top_k=2), strict=True
            ):
                ranked = ", ".join(f"{s.label} {s.score:.0%}" for s in prediction.top_k)
                print(f"{text[:50]!r}: {prediction.label} ({ranked})")


if __name__ == "__main__":
    main()
