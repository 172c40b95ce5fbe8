"""What travels with a request across every hop: identity, deadline, trace context, tenant."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace


@dataclass
class RequestContext:
    """Per-request context carried ingress → decode → prefill (picklable)."""

    request_id: str
    deadline: float | None = None
    trace_headers: dict[str, str] = field(default_factory=dict)
    tenant: str = "anonymous"
    created: float = field(default_factory=time.time)
    # the most attempts a hop makes of a call it retries (None: as its settings say): a
    # resumed leg's prefill makes one, the ingress's resume being its retry (each resume
    # making every attempt, one choice's input could reach prefill_attempts × (1 + resumes)
    # replicas: an input that kills its engine would kill that many)
    attempts: int | None = None

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (None when there is none)."""
        return None if self.deadline is None else self.deadline - time.time()

    def attempts_at_most(self, configured: int) -> int:
        """The attempts this hop makes: `configured`, or fewer where the caller said so."""
        return configured if self.attempts is None else max(1, min(configured, self.attempts))

    def within(self, seconds: float) -> RequestContext:
        """A copy whose deadline is at most `seconds` from now (one attempt of a call)."""
        soonest = time.time() + seconds
        return replace(self, deadline=soonest if self.deadline is None
                       else min(self.deadline, soonest))


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
