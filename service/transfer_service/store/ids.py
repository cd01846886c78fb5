"""The ids every store accepts for heads, jobs and datasets (domain.ID_PATTERN): checked by
the operations layer on each request and again by the store before an id names a file."""

from __future__ import annotations

from transfer_service.domain import ID_PATTERN
from transfer_service.errors import InvalidArgumentError


def check_id(kind: str, value: str) -> str:
    """`value`, if it is a valid id; else InvalidArgumentError naming the field `kind`."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind}: {value!r} is not a valid id (pattern [a-z0-9][a-z0-9_.-]{{0,63}})"
        )
    return value
