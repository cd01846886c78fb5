"""How `transfer predict` writes its answers: the human table, CSV or JSON Lines (one row per
input, written as each chunk comes back), or one JSON document; and the progress bar it
draws on a terminal for long folders."""

from __future__ import annotations

import csv
import sys
from typing import TextIO

from transfer_client import _render as render
from transfer_client.types import ClassScore, Prediction


class PredictionWriter:
    """`write(input, prediction)` for each answer, then `close()`. `style`: "table", "csv",
    "jsonl" or "json"."""

    def __init__(self, style: str, top_k: int, out: TextIO) -> None:
        self._style = style
        self._top_k = top_k
        self._out = out
        self._collected: list[dict[str, object]] = []  # style "json" prints them at the end
        self._answered_by: tuple[str, int] | None = None
        self._csv = csv.writer(out, lineterminator="\n") if style == "csv" else None
        if self._csv is not None:
            ranks = [f"{column}_{k}" for k in range(2, top_k + 1) for column in ("label", "score")]
            self._csv.writerow(["input", "label", "score", *ranks, "head_id", "head_version"])

    def write(self, name: str, prediction: Prediction) -> None:
        scores = prediction.top_k or (ClassScore(prediction.label, prediction.score),)
        if self._style == "json":
            self._collected.append({"input": name, "prediction": prediction})
        elif self._style == "jsonl":
            line = {
                "input": name,
                "label": prediction.label,
                "score": prediction.score,
                "top_k": scores,
                "head_id": prediction.head_id,
                "head_version": prediction.head_version,
            }
            print(render.to_json_line(line), file=self._out)
        elif self._csv is not None:
            others = [str(value) for s in scores[1 : self._top_k] for value in (s.label, s.score)]
            others += [""] * (2 * (self._top_k - 1) - len(others))  # fewer classes than k
            head = (prediction.head_id, prediction.head_version)
            self._csv.writerow([name, prediction.label, prediction.score, *others, *head])
        else:
            self._say_which_head(prediction)
            ranked = ", ".join(f"{s.label} {render.percent(s.score)}" for s in scores)
            print(f"{shorten(name)}\t{ranked}", file=self._out)

    def close(self) -> None:
        if self._style == "json":
            print(render.to_json(self._collected), file=self._out)

    def _say_which_head(self, prediction: Prediction) -> None:
        """On stderr (stdout stays one line per input): the head id and version a reference
        such as `name@production` resolved to, once."""
        answered_by = (prediction.head_id, prediction.head_version)
        if prediction.head_id and answered_by != self._answered_by:
            version = f" (version {prediction.head_version})" if prediction.head_version else ""
            print(f"answered by {prediction.head_id}{version}", file=sys.stderr)
            self._answered_by = answered_by


def shorten(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class CountBar:
    """`bar(done, total)`: a one-line bar redrawn in place on a terminal; nothing elsewhere
    (a pipe or a log keeps only the results)."""

    _WIDTH = 24

    def __init__(self, stream: TextIO, label: str) -> None:
        self._stream = stream
        self._label = label
        self._enabled = stream.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self._enabled or total == 0:
            return
        filled = self._WIDTH * done // total
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        self._stream.write(f"\r{self._label} [{bar}] {done}/{total}")
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
