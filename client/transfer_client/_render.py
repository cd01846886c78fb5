"""Plain-text and JSON renderings of the SDK's dataclasses, for the command line."""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime


def to_json(value: object) -> str:
    return json.dumps(_jsonable(value), indent=2, ensure_ascii=False)


def to_json_line(value: object) -> str:
    """One line of JSON Lines: compact, no newline inside."""
    return json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))


def jsonable(value: object) -> object:
    """Dataclasses, enums and datetimes as plain JSON values (dicts, strings, numbers)."""
    return _jsonable(value)


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; trailing spaces trimmed."""
    lines = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fields(pairs: Iterable[tuple[str, str]]) -> str:
    """`key: value` lines with the values aligned."""
    pairs = list(pairs)
    width = max((len(key) for key, _ in pairs), default=0) + 1
    return "\n".join(f"{key + ':':<{width}} {value}" for key, value in pairs)


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def duration(seconds: float) -> str:
    """`1:02:03`, or `2:03` under an hour."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def count(number: int) -> str:
    """`5.3M`, `12.0k`, `842`."""
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if number >= threshold:
            return f"{number / threshold:.1f}{suffix}"
    return str(number)


def size(byte_count: int) -> str:
    """`3.2 MiB`, `512 B`."""
    value, unit = float(byte_count), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{byte_count} B" if unit == "B" else f"{value:.1f} {unit}"


def local_time(moment: datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")
