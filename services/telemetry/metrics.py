"""Metrics that count in-process and, inside a Ray worker, export through Ray's metrics."""

from __future__ import annotations

from collections import Counter as _Tally


class Counter:
    """A labelled counter: readable locally (`value`), exported by Ray when Ray is running."""

    def __init__(self, name: str, description: str, labels: tuple[str, ...]):
        self.name, self.description, self.labels = name, description, labels
        self._local: _Tally = _Tally()
        self._ray = None

    def inc(self, amount: float = 1.0, **tags: str) -> None:
        key = tuple(tags[label] for label in self.labels)
        self._local[key] += amount
        exporter = self._exporter()
        if exporter is not None:
            exporter.inc(amount, tags=tags)

    def value(self, **tags: str) -> float:
        return self._local[tuple(tags[label] for label in self.labels)]

    def _exporter(self):
        if self._ray is None:
            import ray

            if not ray.is_initialized():
                return None
            from ray.util import metrics

            self._ray = metrics.Counter(self.name, self.description, tag_keys=self.labels)
        return self._ray
