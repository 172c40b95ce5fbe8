"""The records the stack's logger writes while a block runs (at INFO, whatever its level)."""

from __future__ import annotations

import logging

from services.telemetry.logs import LOGGER


class LogLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == message]

    def __enter__(self) -> LogLines:
        logger = logging.getLogger(LOGGER)
        self._level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger(LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)
