"""`predict_files`: a folder of images, a CSV of texts, or a list of files, as Predict calls
within the server's limits, results in input order. The clients keep only the calls."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from transfer_client.errors import FieldViolation, TransferError, error_for_code
from transfer_client.types import Prediction

# The server's defaults (TRANSFER_MAX_PREDICT_INPUTS, TRANSFER_MAX_MESSAGE_BYTES): at most
# 512 inputs per Predict, messages up to 64 MiB. A chunk stays under both, and under the
# client's own message limit, with room for the message's framing.
MAX_PREDICT_INPUTS = 512
MAX_CHUNK_BYTES = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 64
_MESSAGE_MARGIN_BYTES = 64 * 1024
_PER_INPUT_OVERHEAD_BYTES = 16  # an Input's tag and length prefixes, generously

# What a folder walk picks up (other files, and hidden ones, are skipped).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True, slots=True)
class FileInput:
    """One input to predict: `key` is what `predict_files` yields it under (the file's path,
    or for a CSV row its text), `value` what is sent (a Path, read when its chunk is built;
    or the text), `size` about how many bytes it takes in the request."""

    key: str
    value: Path | str
    size: int


Source = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def collect_inputs(source: Source) -> list[FileInput]:
    """The inputs `source` names, in order: a directory gives its image files (by suffix,
    sorted by path, recursively, hidden files and folders skipped; none is ValueError), a
    `.csv` file one text per row of its `text` column, any other file itself; a list gives
    each item's in turn."""
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    inputs: list[FileInput] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = _walk_images(path)
            if not found:
                suffixes = " ".join(sorted(IMAGE_SUFFIXES))
                raise ValueError(f"{path}: no image files ({suffixes}) in this folder")
            inputs.extend(_image_file(file) for file in found)
        elif path.suffix.lower() == ".csv":
            inputs.extend(_csv_texts(path))
        elif path.is_file():
            inputs.append(_image_file(path))
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return inputs


def _walk_images(root: Path) -> list[Path]:
    files = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    ]
    return sorted(files, key=lambda path: path.relative_to(root).parts)


def _image_file(path: Path) -> FileInput:
    return FileInput(str(path), path, path.stat().st_size + _PER_INPUT_OVERHEAD_BYTES)


def _csv_texts(path: Path) -> list[FileInput]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        if "text" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: the header row must name a 'text' column")
        return [
            FileInput(
                row["text"], row["text"], len(row["text"].encode()) + _PER_INPUT_OVERHEAD_BYTES
            )
            for row in reader
        ]


def chunk_limits(chunk_size: int, max_message_bytes: int) -> tuple[int, int]:
    """(inputs, bytes) per Predict call, or ValueError for a chunk_size the server refuses."""
    if not 1 <= chunk_size <= MAX_PREDICT_INPUTS:
        raise ValueError(
            f"chunk_size: {chunk_size} is not from 1 to {MAX_PREDICT_INPUTS} "
            "(the server's most inputs per Predict)"
        )
    return chunk_size, min(MAX_CHUNK_BYTES, max_message_bytes - _MESSAGE_MARGIN_BYTES)


def chunks(
    inputs: Sequence[FileInput], max_inputs: int, max_bytes: int
) -> Iterator[tuple[int, Sequence[FileInput]]]:
    """(position of the first, inputs) for consecutive runs of at most `max_inputs` inputs
    and `max_bytes` bytes; an input larger than `max_bytes` goes alone (the server then says
    whether it takes it)."""
    start = 0
    while start < len(inputs):
        end, size = start, 0
        while end < len(inputs) and end - start < max_inputs:
            if end > start and size + inputs[end].size > max_bytes:
                break
            size += inputs[end].size
            end += 1
        yield start, inputs[start:end]
        start = end


def answered(
    chunk: Sequence[FileInput], predictions: Sequence[Prediction]
) -> list[tuple[str, Prediction]]:
    if len(predictions) != len(chunk):
        raise error_for_code(
            "INTERNAL", f"Predict answered {len(predictions)} of {len(chunk)} inputs"
        )
    return [(item.key, prediction) for item, prediction in zip(chunk, predictions, strict=True)]


def pinned_head(head: str, predictions: Sequence[Prediction]) -> str:
    """The head id the first chunk's reference resolved to, for the chunks after it: a
    whole folder is answered by one version even if an alias moves meanwhile (the head
    reference as given, from a server that does not say)."""
    return predictions[0].head_id if predictions and predictions[0].head_id else head


def located(error: TransferError, chunk: Sequence[FileInput], first: int) -> TransferError:
    """`error` from one chunk's call, naming the input at fault by its key (a file, a text)
    and its position among all the inputs, rather than its position in the chunk."""
    violations = []
    keys = []
    for violation in error.field_violations:
        index = violation.index
        if index is None or not 0 <= index < len(chunk):
            violations.append(violation)
            continue
        rest = violation.field.split("]", 1)[1]
        violations.append(FieldViolation(f"inputs[{first + index}]{rest}", violation.description))
        keys.append(f"{chunk[index].key}: {violation.description}")
    if not keys and error.message.startswith("inputs["):
        # An error without field details (e.g. RESOURCE_EXHAUSTED for an image's pixel
        # count) still leads with the input's field in its message.
        field, _, description = error.message.partition(": ")
        index = FieldViolation(field, description).index
        if index is not None and 0 <= index < len(chunk):
            keys.append(f"{chunk[index].key}: {description}")
    message = "; ".join(keys) if keys else error.message
    return error_for_code(
        error.code, message, request_id=error.request_id, field_violations=violations
    )
