"""ListJobs' page tokens: opaque to callers, the position after the last job of a page."""

from __future__ import annotations

import base64
from datetime import datetime

from transfer_service.domain import JobRecord
from transfer_service.errors import InvalidArgumentError
from transfer_service.store.ids import check_id


def page_token_after(last: JobRecord) -> str:
    """Opaque to callers: the last job's created time and id, where the next page starts."""
    text = f"{last.created_time.isoformat()}|{last.job_id}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def read_page_token(token: str) -> tuple[datetime, str]:
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return datetime.fromisoformat(created), check_id("page_token", job_id)
    except (ValueError, UnicodeError, InvalidArgumentError):
        raise InvalidArgumentError(
            "page_token: not a token from ListJobs (send the last next_page_token as it came)"
        ) from None
