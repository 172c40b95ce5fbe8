"""The handoff state machine, driven by the decode side for each request.

    PENDING ──▶ TRANSFERRING ──▶ READY ──▶ CONSUMED
       │             │             │
       └─────────────┴─────────────┴──▶ FAILED | ABORTED

PENDING: a ticket is open, prefill not yet asked. TRANSFERRING: prefill is running and will send
the KV. READY: the ticket names KV that can be received. CONSUMED: the decode engine imported it
(the transfer holds nothing any more). FAILED: prefill or the transfer failed. ABORTED: the
request was cancelled. Every terminal state releases the ticket; illegal moves raise.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from services.kv.protocol import KVHandoff, KVTicket


class KVState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    READY = "ready"
    CONSUMED = "consumed"
    FAILED = "failed"
    ABORTED = "aborted"


TERMINAL = frozenset({KVState.CONSUMED, KVState.FAILED, KVState.ABORTED})
_NEXT = {
    KVState.PENDING: {KVState.TRANSFERRING, KVState.FAILED, KVState.ABORTED},
    KVState.TRANSFERRING: {KVState.READY, KVState.FAILED, KVState.ABORTED},
    KVState.READY: {KVState.CONSUMED, KVState.FAILED, KVState.ABORTED},
}


class IllegalTransition(RuntimeError):
    """A transfer was asked to move between states the machine does not connect."""


class KVTransfer:
    """One request's handoff: the ticket, its state and when each state was entered."""

    def __init__(self, handoff: KVHandoff, request_id: str):
        self.handoff = handoff
        self.ticket: KVTicket = handoff.open(request_id)
        self.state = KVState.PENDING
        self.entered: dict[KVState, float] = {KVState.PENDING: time.perf_counter()}

    def move(self, state: KVState) -> None:
        """Enter `state`; terminal states release the ticket."""
        if state not in _NEXT.get(self.state, set()):
            raise IllegalTransition(f"KV transfer {self.ticket.request_id}: "
                                    f"{self.state.value} -> {state.value}")
        self.state = state
        self.entered[state] = time.perf_counter()
        if state in TERMINAL:
            self.handoff.release(self.ticket)

    def ready(self, ticket: KVTicket) -> None:
        """Prefill sent the KV: keep its ticket and enter READY."""
        self.ticket = ticket
        self.move(KVState.READY)

    async def consume(self, request: Any = None) -> Any:
        """Receive the KV (of `request`, for a handoff that starts the decode engine's side)
        and enter CONSUMED."""
        kv = await self.handoff.receive(self.ticket, request)
        self.move(KVState.CONSUMED)
        return kv

    def end(self, state: KVState) -> None:
        """Close the transfer as FAILED or ABORTED unless it already ended."""
        if self.state not in TERMINAL:
            self.move(state)

    def seconds(self, start: KVState, end: KVState) -> float:
        """Between entering `start` and `end`; 0 when either was not entered (here)."""
        if start not in self.entered or end not in self.entered:
            return 0.0
        return self.entered[end] - self.entered[start]
