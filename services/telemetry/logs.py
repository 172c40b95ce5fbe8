"""Structured JSON log lines carrying the request id and trace id."""

from __future__ import annotations

import json
import logging
import sys
import time

LOGGER = "small4"


def _extra(record: logging.LogRecord) -> dict:
    """A record's `extra` fields: not the record's own, not a formatter's (`asctime`), not
    private ones (Ray's record factory adds `_ray_timestamp_ns` to every record)."""
    return {k: v for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")}


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 6), "level": record.levelname,
                "logger": record.name, "message": record.getMessage()}
        line.update(_extra(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """A text line with its `extra` fields as `key=value` (values as JSON, so a newline a
    client put in one stays on the line), then any traceback: the ids an SRE greps for are on
    the line with the level, in either log format."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if extra := _extra(record):
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def configure_logging(json_logs: bool) -> logging.Logger:
    """The `small4` logger, writing one line per record to the process's own stderr (once per
    process); inside a Serve replica each line also names the app, deployment and replica.

    The process's own stderr, not `sys.stderr`: in a replica Serve replaces that with a stream
    into its own logger (in its throughput-optimized mode, our default), which wraps each line
    in its text format (no longer JSON), holds it in a 1,000-record buffer (lost with the
    process: the lines around a crash are the ones an SRE needs) and walks the call stack on
    every write. A Ray worker's stderr is its `logs/worker-*.err` file in the session's log
    directory, which Ray also streams to the driver (`small4 up` shows it)."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
        handler.setFormatter(JsonFormatter() if json_logs else TextFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
        if identity := serve_identity():
            handler.addFilter(_Stamp(identity))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def request_line(logger: logging.Logger, event: str, *, request_id: str | None,
                 trace_id: str | None, started: float, **fields) -> None:
    """Log one request event with its ids and elapsed milliseconds."""
    logger.info(event, extra={"request_id": request_id, "trace_id": trace_id,
                              "elapsed_ms": round(1e3 * (time.perf_counter() - started), 3),
                              **fields})


class _Stamp(logging.Filter):
    """Adds the same fields to every record (which replica wrote it)."""

    def __init__(self, fields: dict[str, str]):
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.update(self.fields)
        return True


def serve_identity() -> dict[str, str]:
    """The app, deployment and replica (its unique id) this process serves ({} outside a Serve
    replica: tests, the CLI, `small4 generate`)."""
    try:
        from ray import serve

        replica = serve.get_replica_context().replica_id
    except Exception:  # not in a replica (tests, the CLI), or Ray is not installed
        return {}
    return {"app": replica.deployment_id.app_name, "deployment": replica.deployment_id.name,
            "replica": replica.unique_id}
