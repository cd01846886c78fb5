"""`transfer predict HEAD INPUT...`: classify image files, folders of them, CSVs of texts
(their `text` column), or texts given on the command line (--text). Folders and CSVs go in
chunks within the server's limit per call; the answers stream out as a table, CSV or JSON
Lines."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from transfer_client._cli_commands import AddCommand
from transfer_client._cli_predict_output import CountBar, PredictionWriter
from transfer_client._predict_files import DEFAULT_CHUNK_SIZE, MAX_PREDICT_INPUTS
from transfer_client._sync import TransferClient
from transfer_client.types import Prediction


def register(add: AddCommand) -> None:
    predict = add(
        "predict",
        _predict,
        "classify image files, folders of them, CSVs of texts, or texts (--text)",
    )
    predict.add_argument(
        "head_id",
        metavar="HEAD",
        help="a head id, or a name: NAME (its production alias, else its latest version), "
        "NAME@3, NAME@production",
    )
    predict.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files; folders (their image files, recursively); .csv files (one text "
        "per row of their `text` column); or, with --text, texts",
    )
    predict.add_argument("--top-k", type=int, default=1, help="classes to show per input")
    predict.add_argument("--text", action="store_true", help="the inputs are texts, not files")
    predict.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"inputs per Predict call (at most {MAX_PREDICT_INPUTS}, the server's limit)",
    )
    output = predict.add_mutually_exclusive_group()
    output.add_argument(
        "--csv",
        action="store_true",
        help="CSV: input, label, score, label_2, score_2, ... (with --top-k), head_id, "
        "head_version",
    )
    output.add_argument(
        "--jsonl",
        action="store_true",
        help="one JSON object per input: input, label, score, top_k, head_id, head_version",
    )


def _predict(client: TransferClient, args: argparse.Namespace) -> int:
    style = "csv" if args.csv else "jsonl" if args.jsonl else "json" if args.json else "table"
    writer = PredictionWriter(style, args.top_k, sys.stdout)
    bar = CountBar(sys.stderr, "predicting")
    try:
        for name, prediction in _answers(client, args, bar):
            writer.write(name, prediction)
    finally:
        bar.finish()
    writer.close()
    return 0


def _answers(
    client: TransferClient, args: argparse.Namespace, bar: CountBar
) -> Iterator[tuple[str, Prediction]]:
    if args.text:
        if not 1 <= args.chunk_size <= MAX_PREDICT_INPUTS:
            raise ValueError(f"--chunk-size: {args.chunk_size} is not from 1 to 512")
        head = args.head_id
        for first in range(0, len(args.inputs), args.chunk_size):
            texts = args.inputs[first : first + args.chunk_size]
            predictions = client.predict(head, texts, top_k=args.top_k)
            # The id the reference resolved to answers the rest: one version for all.
            head = predictions[0].head_id or head
            yield from zip(texts, predictions, strict=True)
        return
    yield from client.predict_files(
        args.head_id,
        [Path(item) for item in args.inputs],
        top_k=args.top_k,
        chunk_size=args.chunk_size,
        on_progress=bar,
    )
