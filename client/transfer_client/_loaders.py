"""Labelled examples from local files: an ImageFolder-style directory or a `text,label` CSV."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

# Other files in a class folder (notes, thumbnails caches) are skipped, as ImageFolder does.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)


def load_examples(source: Path) -> list[tuple[Path, str]] | list[tuple[str, str]]:
    """Image examples from a directory, text examples from a `.csv` file."""
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_dir():
        return image_folder_examples(source)
    if source.suffix.lower() == ".csv":
        return text_csv_examples(source)
    raise ValueError(f"{source} is neither a directory of class folders nor a .csv file")


def image_folder_examples(root: Path) -> list[tuple[Path, str]]:
    """One sub-folder per class, named after it, image files inside (at any depth).

    Hidden files and folders are ignored. Files are read later, when they are sent.
    """
    examples: list[tuple[Path, str]] = []
    for class_dir in sorted(root.iterdir()):
        if not class_dir.is_dir() or _is_hidden(class_dir.name):
            continue
        for path in sorted(class_dir.rglob("*")):
            relative_parts = path.relative_to(class_dir).parts
            if (
                path.suffix.lower() in IMAGE_SUFFIXES
                and not any(_is_hidden(part) for part in relative_parts)
                and path.is_file()
            ):
                examples.append((path, class_dir.name))
    if not examples:
        raise ValueError(f"no image files found in class folders under {root}")
    return examples


def text_csv_examples(path: Path) -> list[tuple[str, str]]:
    """Rows of a CSV file whose header row names a `text` and a `label` column."""
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = set(reader.fieldnames or ())
        if not {"text", "label"} <= columns:
            raise ValueError(f"{path}: the header row must name a 'text' and a 'label' column")
        examples = [(row["text"], row["label"]) for row in reader]
    if not examples:
        raise ValueError(f"{path} has no rows")
    return examples


def payload_bytes(examples: list[tuple[Path, str]] | list[tuple[str, str]]) -> int:
    """Roughly how many bytes the examples take on the wire."""
    return sum(
        (value.stat().st_size if isinstance(value, Path) else len(value.encode())) + len(label)
        for value, label in examples
    )


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


_INDEXED_FIELD = re.compile(r"^(?P<collection>[a-z_]+)\[(?P<index>\d+)\]")


def indexed_sources(
    error: Exception, collection: str, sources: Sequence[Path | str]
) -> list[tuple[str, str]]:
    """(field, local source) for each field of `error` that names an element of the request's
    `collection` ("examples[17].image" -> the file examples[17] was read from), so a message
    about an index can name the user's file. The fields come from the error's structured
    field violations; a job that failed after it started carries none, so its message's
    leading field is read instead."""
    fields = [violation.field for violation in getattr(error, "field_violations", ())]
    if not fields:
        fields = [str(getattr(error, "message", error)).split(":", 1)[0]]
    named: list[tuple[str, str]] = []
    for field in fields:
        match = _INDEXED_FIELD.match(field)
        if match is None or match["collection"] != collection:
            continue
        index = int(match["index"])
        if index < len(sources):
            named.append((field, str(sources[index])))
    return named
