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

    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (None when there is none)."""
        return None if self.deadline is None else self.deadline - time.time()

    def within(self, seconds: float) -> RequestContext:
        """A copy whose deadline is at most `seconds` from now (one attempt of a call)."""
        soonest = time.time() + seconds
        return replace(self, deadline=soonest if self.deadline is None
                       else min(self.deadline, soonest))


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
