"""CPU implementations of the KV handoff: in-process (colocated) and Ray's object store."""

from __future__ import annotations

import asyncio
from typing import Any

from services.errors import KVHandoffFailed
from services.kv.protocol import KVTicket
from services.settings import KVHandoffSettings


def _size(kv: Any) -> tuple[int, int]:
    return int(getattr(kv, "num_tokens", 0)), int(getattr(kv, "nbytes", 0))


class LocalHandoff:
    """Prefill and decode in one process: the ticket carries the KV object itself."""

    backend = "local"
    concurrent = False

    def open(self, request_id: str) -> KVTicket:
        return KVTicket(request_id, self.backend)

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket:
        ticket.payload = kv
        ticket.num_tokens, ticket.nbytes = _size(kv)
        return ticket

    async def receive(self, ticket: KVTicket) -> Any:
        if ticket.payload is None:
            raise KVHandoffFailed(f"no KV was sent for {ticket.request_id}")
        return ticket.payload

    def release(self, ticket: KVTicket) -> None:
        ticket.payload = None


class ObjectStoreHandoff:
    """KV through Ray's object store: prefill `ray.put`s it, decode fetches it by reference.

    The object lives while a ticket refers to it; `release` drops the decode side's reference,
    so an aborted or failed request leaves nothing behind once the prefill side has returned.
    """

    backend = "object_store"
    concurrent = False

    def __init__(self, settings: KVHandoffSettings):
        self.timeout_s = settings.timeout_s

    def open(self, request_id: str) -> KVTicket:
        return KVTicket(request_id, self.backend)

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket:
        import ray

        ticket.payload = [ray.put(kv)]  # in a list so Ray never resolves it implicitly
        ticket.num_tokens, ticket.nbytes = _size(kv)
        return ticket

    async def receive(self, ticket: KVTicket) -> Any:
        import ray

        if not ticket.payload:
            raise KVHandoffFailed(f"no KV was sent for {ticket.request_id}")
        try:
            return await asyncio.wait_for(ticket.payload[0], self.timeout_s)
        except asyncio.TimeoutError:
            raise KVHandoffFailed(
                f"KV for {ticket.request_id} not received within {self.timeout_s}s") from None
        except ray.exceptions.RayError as exc:
            raise KVHandoffFailed(f"KV for {ticket.request_id} was lost: {type(exc).__name__}",
                                  request_id=ticket.request_id) from None

    def release(self, ticket: KVTicket) -> None:
        ticket.payload = None


def build_handoff(settings: KVHandoffSettings):
    """The handoff named by `settings.backend`; SGLang's comes with its engine adapter."""
    if settings.backend == "local":
        return LocalHandoff()
    if settings.backend == "object_store":
        return ObjectStoreHandoff(settings)
    raise ValueError(f"KV handoff backend {settings.backend!r} is not available on this host; "
                     "it needs the SGLang engine (install the 'sglang' extra on a GPU host)")
