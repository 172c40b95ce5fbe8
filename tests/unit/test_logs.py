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


@pytest.mark.parametrize("worker, json_logs", [("multimodal", True), ("decode", False)])
def test_every_worker_writes_its_lines_in_the_configured_format(worker, json_logs):
    """`telemetry.json_logs` was the ingress's alone: a decode or image replica's `small4.*`
    lines reached Serve's text handler whatever it said. A fresh process each: the logger is
    configured once per process."""
    import subprocess
    import sys

    build = {"multimodal": "from services.workers.multimodal import MultimodalWorker\n"
                           "MultimodalWorker(settings.multimodal_settings())\n",
             "decode": "from services.workers.decode import DecodeWorker\n"
                       "DecodeWorker(settings.worker('fast'), None)\n"}[worker]
    code = ("import logging\n"
            "from cluster.settings import parse_settings\n"
            "settings = parse_settings({'auth': {'enabled': False}, 'engine': {'kind': "
            f"'simulated'}}, 'telemetry': {{'json_logs': {json_logs}}}}})\n"
            + build +
            "logging.getLogger('small4.decode').warning('closing failed')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ,
                                            "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    line = [x for x in done.stderr.splitlines() if "closing failed" in x][-1]
    if json_logs:
        assert json.loads(line)["message"] == "closing failed"
    else:
        assert "WARNING small4.decode closing failed" in line
