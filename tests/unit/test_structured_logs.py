"""Log lines: JSON objects with the request scope, or text; exceptions included."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator

import pytest
from transfer_service import request_scope
from transfer_service.structured_logs import configure_logging


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    service_level = logging.getLogger("transfer_service").level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("transfer_service").setLevel(service_level)
    logging.captureWarnings(False)


def in_request(function: object, request_id: str, tenant: str) -> None:
    def run() -> None:
        request_scope.request_id.set(request_id)
        request_scope.tenant.set(tenant)
        function()  # type: ignore[operator]

    contextvars.copy_context().run(run)


def test_json_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    log = logging.getLogger("transfer_service.example")
    log.info("outside %s", "a call")

    def failing() -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed with %d", 42)

    in_request(failing, "req-1", "acme")
    log.debug("not at INFO")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first.keys() == {"time", "level", "logger", "message"}
    assert first["message"] == "outside a call" and first["level"] == "INFO"
    assert second["request_id"] == "req-1" and second["tenant"] == "acme"
    assert second["level"] == "ERROR" and second["logger"] == "transfer_service.example"
    assert second["message"] == "it failed with 42"
    assert second["exception"].startswith("Traceback") and "ValueError: boom" in second["exception"]


def test_text_lines_and_levels(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "text", stream)
    in_request(
        lambda: logging.getLogger("transfer_service.example").debug("detail"), "req-2", "acme"
    )
    logging.getLogger("some.library").debug("library noise")
    logging.getLogger("some.library").info("library news")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(" DEBUG transfer_service.example [req-2]: detail")
    assert lines[1].endswith(" INFO some.library: library news")


class FakeTerminal(io.StringIO):
    def __init__(self, *, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_auto_writes_text_to_a_terminal_and_json_elsewhere(restore_logging: None) -> None:
    for tty in (True, False):
        stream = FakeTerminal(tty=tty)
        configure_logging("INFO", "auto", stream)
        logging.getLogger("transfer_service.example").info("hello")
        line = stream.getvalue().strip()
        if tty:
            assert "hello" in line and not line.startswith("{")
        else:
            assert json.loads(line)["message"] == "hello"
