"""Request log lines carry their ids in either format, on one line whatever a client sent."""

from __future__ import annotations

import json
import logging
import time

import pytest

from services.telemetry.logs import JsonFormatter, TextFormatter, request_line


class _Last(logging.Handler):
    record: logging.LogRecord | None = None

    def emit(self, record):
        self.record = record


@pytest.mark.parametrize("formatter", [
    TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"), JsonFormatter()])
def test_a_request_line_names_its_ids_on_one_line_in_either_format(formatter):
    """The text format printed `... INFO small4 request refused` alone: no request id, no
    trace id, no status to grep for."""
    logger, last = logging.getLogger("small4-test-logs"), _Last()
    logger.addHandler(last)
    logger.setLevel(logging.INFO)
    try:
        request_line(logger, "request refused", request_id="chatcmpl-1", trace_id="ab" * 16,
                     started=time.perf_counter(), status=401, path="/v1/x\ninjected INFO y")
    finally:
        logger.removeHandler(last)
    line = formatter.format(last.record)
    assert "\n" not in line and "request refused" in line
    for value in ("chatcmpl-1", "ab" * 16, "401", "elapsed_ms", json.dumps("/v1/x\ninjected "
                                                                          "INFO y")[1:-1]):
        assert value in line
    assert "_ray" not in line and "asctime" not in line.split("request refused")[1]


def test_a_text_lines_ids_stay_on_its_first_line_above_its_traceback():
    logger, last = logging.getLogger("small4-test-logs"), _Last()
    logger.addHandler(last)
    logger.setLevel(logging.INFO)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("stream failed", extra={"request_id": "chatcmpl-2"})
    finally:
        logger.removeHandler(last)
    first, *rest = TextFormatter("%(levelname)s %(message)s").format(last.record).splitlines()
    assert first == 'ERROR stream failed request_id="chatcmpl-2"'
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"
