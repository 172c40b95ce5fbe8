"""The KV-handoff seam: how a prompt's KV cache gets from a prefill engine to a decode engine.

Calling convention (the decode side drives; see `services.kv.transfer` for the states):
- `open(request_id)` on the decode side reserves a transfer and returns a `KVTicket` to send along
  with the prefill request (SGLang: the bootstrap host/port/room both engines meet at).
- `send(ticket, kv)` on the prefill side, after prefill, makes the KV available and returns the
  ticket to hand back (object store: `ray.put`; SGLang: nothing, its engine pushes the KV itself).
- `receive(ticket, request)` on the decode side returns the KV in the engine's import form once it
  is there; raises `KVHandoffFailed` on timeout or loss. SGLang's starts the decode engine's
  request for the room and returns once that engine has the KV (its first output).
- `release(ticket)` frees whatever the transfer still holds; safe to call twice.
- `holds(ticket)` on the prefill side, after `send`: whether it keeps something for the ticket
  (an object in its store) that only `release` frees; a KV sent by value in the ticket holds
  nothing, so the prefill replica has nothing to wait for.
`concurrent` says whether the decode engine may start before prefill finishes (SGLang) or only
after (object store: sequential). A concurrent handoff also has `bind(ticket)`, called on the
prefill replica before it runs: it fills in where that replica serves the KV (SGLang: its
bootstrap host and port), and the decode side learns it before the prefill is done; its
`receive` returns a `PairedKV`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class KVTicket:
    """A transfer's identity and, once sent, where its KV is. Picklable; crosses Ray hops."""

    request_id: str
    backend: str
    payload: Any = None
    num_tokens: int = 0
    nbytes: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairedKV:
    """What a concurrent handoff gives the decode engine: the prompt's first token and KV, or
    neither (SGLang: the decode engine gets both from the prefill engine and streams from the
    first token)."""

    first_token: int | None = None
    kv: Any = None
    first_logprob: Any = None  # the first token's TokenLogprob when the request asked for them


@runtime_checkable
class KVHandoff(Protocol):
    """Moves one request's KV from prefill to decode."""

    backend: str
    concurrent: bool

    def open(self, request_id: str) -> KVTicket: ...

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket: ...

    async def receive(self, ticket: KVTicket, request: Any = None) -> Any: ...

    def release(self, ticket: KVTicket) -> None: ...

    def holds(self, ticket: KVTicket) -> bool: ...
