"""`transfer predict`: classify files or texts with a head."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._sync import TransferClient
from transfer_client.types import ClassScore, InputData


def register(add: AddCommand) -> None:
    predict = add("predict", _predict, "classify images (or texts, with --text)")
    predict.add_argument("head_id", metavar="HEAD")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or texts")
    predict.add_argument("--top-k", type=int, default=1, help="classes to show per input")
    predict.add_argument("--text", action="store_true", help="the inputs are texts, not files")


def _predict(client: TransferClient, args: argparse.Namespace) -> int:
    inputs: list[InputData] = list(args.inputs) if args.text else [Path(i) for i in args.inputs]
    predictions = client.predict(args.head_id, inputs, top_k=args.top_k)
    if args.json:
        print(
            render.to_json(
                [
                    {"input": name, "prediction": prediction}
                    for name, prediction in zip(args.inputs, predictions, strict=True)
                ]
            )
        )
        return 0
    for name, prediction in zip(args.inputs, predictions, strict=True):
        scores = prediction.top_k or (ClassScore(prediction.label, prediction.score),)
        ranked = ", ".join(f"{score.label} {render.percent(score.score)}" for score in scores)
        print(f"{_shorten(name)}\t{ranked}")
    return 0


def _shorten(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
