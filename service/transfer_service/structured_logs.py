"""Log output: one JSON object per line by default, or plain text for humans.

Inside an RPC every line carries the request id and tenant (from transfer_service.request_scope), so
all the lines of one call can be found together.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

from transfer_service import request_scope

LogFormat = Literal["auto", "json", "text"]

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestScopeFilter(logging.Filter):
    """Copies the current request id and tenant onto each record (None outside an RPC)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_scope.current_request_id()
        record.__dict__["request_id"] = request_id
        record.__dict__["tenant"] = request_scope.tenant.get(None)
        record.__dict__["request_tag"] = f" [{request_id}]" if request_id else ""
        return True


class JsonLineFormatter(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message; request_id and tenant inside an RPC;
    exception (the formatted traceback) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "tenant"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: LogFormat, stream: TextIO = sys.stderr) -> None:
    """Replaces the root logger's handlers with one writing `log_format` lines to `stream`
    ("auto": text on a terminal, JSON elsewhere);
    Python warnings are logged too, so they come out in the same format. `level` applies to
    the service's own loggers; libraries log from INFO up (their DEBUG output is per-call
    noise, e.g. grpc's event-loop messages)."""
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestScopeFilter())
    if log_format == "auto":  # a person at a terminal reads text; collectors parse JSON
        log_format = "text" if stream.isatty() else "json"
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.getLevelName(level), logging.INFO))
    logging.getLogger("transfer_service").setLevel(level)
    logging.captureWarnings(True)
