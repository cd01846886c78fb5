"""ListJobs' and ListHeads' page tokens: opaque to callers, the position after the last record
of a page (its created time and id) and a digest of the filters the page was read with, so a
token sent with other filters is refused instead of paging a different listing."""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from transfer_service.errors import InvalidArgumentError
from transfer_service.store.ids import check_id

RecordT = TypeVar("RecordT")

# Most records in one page, and what page_size 0 means: a tenant can hold hundreds of
# thousands of jobs, and answering them in one message cost seconds of the event loop
# (converting 200,000 jobs to protobuf took 2.7 s).
MAX_PAGE = 1000


def _digest(filters: tuple[str, ...]) -> str:
    return hashlib.sha256("\x1f".join(filters).encode()).hexdigest()[:16]


def page_token_after(created: datetime, record_id: str, filters: tuple[str, ...] = ()) -> str:
    text = f"{created.isoformat()}|{record_id}|{_digest(filters)}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def read_page_token(token: str, filters: tuple[str, ...] = ()) -> tuple[datetime, str]:
    """The (created time, id) a token continues after; INVALID_ARGUMENT for a token that is
    not one of ours, or was issued for other filters."""
    try:
        created, record_id, digest = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        position = datetime.fromisoformat(created), check_id("page_token", record_id)
    except (ValueError, UnicodeError, InvalidArgumentError):
        raise InvalidArgumentError(
            "page_token: not a token from this listing (send the last next_page_token as it came)"
        ) from None
    if digest != _digest(filters):
        raise InvalidArgumentError(
            "page_token: issued for other filters; send the filters of the call that "
            "returned it, or no page_token to start over"
        )
    return position


async def read_page(
    read: Callable[..., list[RecordT]],
    blocking: Callable[..., Awaitable[list[RecordT]]],
    position: Callable[[RecordT], tuple[datetime, str]],
    page_size: int,
    page_token: str,
    filters: tuple[str, ...],
) -> tuple[list[RecordT], str]:
    """One page and the token of the next ("" on the last). `read(after=..., limit=...)`
    reads the records past `after`, oldest first, run by `blocking` off the event loop;
    `position` is a record's (created time, id). `page_size` 0, or over MAX_PAGE, reads as
    MAX_PAGE."""
    size = min(page_size, MAX_PAGE) if page_size > 0 else MAX_PAGE
    after = read_page_token(page_token, filters) if page_token else None
    # One more than the page: whether another page follows, without a count query.
    records = await blocking(functools.partial(read, after=after, limit=size + 1))
    if len(records) <= size:
        return records, ""
    records = records[:size]
    return records, page_token_after(*position(records[-1]), filters)
