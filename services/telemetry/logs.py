"""Structured JSON log lines carrying the request id and trace id."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "small4"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _standard = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 6), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        line.update({k: v for k, v in record.__dict__.items() if k not in self._standard})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(json_logs: bool) -> logging.Logger:
    """The `small4` logger, writing JSON lines to stderr (once per process)."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def request_line(logger: logging.Logger, event: str, *, request_id: str,
                 trace_id: str | None, started: float, **fields) -> None:
    """Log one request event with its ids and elapsed milliseconds."""
    logger.info(event, extra={"request_id": request_id, "trace_id": trace_id,
                              "elapsed_ms": round(1e3 * (time.perf_counter() - started), 3),
                              **fields})
