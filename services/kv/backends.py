"""CPU implementations of the KV handoff: in-process (colocated), Ray's object store, and
SGLang-style pairing in one process."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from services.errors import KVHandoffFailed
from services.kv.held import Held
from services.kv.protocol import KVTicket, PairedKV
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

    async def receive(self, ticket: KVTicket, request: Any = None) -> Any:
        if ticket.payload is None:
            raise KVHandoffFailed(f"no KV was sent for {ticket.request_id}")
        return ticket.payload

    def release(self, ticket: KVTicket) -> None:
        ticket.payload = None

    def holds(self, ticket: KVTicket) -> bool:
        return False  # the ticket is the KV


class ObjectStoreHandoff:
    """KV between replicas: a small one in the prefill reply itself, a large one through Ray's
    object store, where prefill puts it and decode fetches it by identity.

    Up to `inline_bytes` the KV rides in the reply, as Ray inlines small task results: the
    transport that brings the reply brings the KV, and no reference crosses processes at all.
    A larger one is copied once more for each hop it rides (the reply, then the ingress's call
    to decode on the sequential path) and held in each process's memory meanwhile, so the
    ticket carries a `Held` (the object's id and owner, not a counted reference: Ray miscounts
    references nested in Serve calls, see `services.kv.held`). The prefill side keeps that
    KV alive until it releases its ticket, which its worker does once the decode side has
    closed the call the ticket came back in (it has the KV, gave up, or was cancelled) or the
    handoff's timeout has passed; so nothing outlives a request, whatever became of it. A KV
    that does not arrive fails the decode side's attempt, which prefills again.
    """

    backend = "object_store"
    concurrent = False

    def __init__(self, settings: KVHandoffSettings):
        self.timeout_s = settings.timeout_s
        self.inline_bytes = settings.inline_bytes

    def open(self, request_id: str) -> KVTicket:
        return KVTicket(request_id, self.backend)

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket:
        ticket.num_tokens, ticket.nbytes = _size(kv)
        ticket.payload = kv if ticket.nbytes <= self.inline_bytes else Held.put(kv)
        return ticket

    async def receive(self, ticket: KVTicket, request: Any = None) -> Any:
        import ray

        if ticket.payload is None:
            raise KVHandoffFailed(f"no KV was sent for {ticket.request_id}")
        if not isinstance(ticket.payload, Held):
            return ticket.payload
        try:  # (`asyncio.timeout`: Python 3.11's `wait_for` loses a cancel that comes as the
            # fetch completes, and the request's decode would run on for a caller gone)
            async with asyncio.timeout(self.timeout_s):
                return await ticket.payload.fetch()
        except TimeoutError:
            raise KVHandoffFailed(
                f"KV for {ticket.request_id} not received within {self.timeout_s}s",
                request_id=ticket.request_id) from None
        except ray.exceptions.RayError as exc:
            raise KVHandoffFailed(f"KV for {ticket.request_id} was lost: {type(exc).__name__}",
                                  request_id=ticket.request_id) from None

    def release(self, ticket: KVTicket) -> None:
        ticket.payload = None

    def holds(self, ticket: KVTicket) -> bool:
        """Only a KV put in the object store is held (a small one rode in the reply)."""
        return isinstance(ticket.payload, Held)


# Rooms of the in-process paired handoff: room -> the future its prefill publishes into.
_ROOMS: dict[int, asyncio.Future] = {}


class PairedHandoff:
    """SGLang's pairing, in one process, on the CPU engines: the decode side opens a room, the
    prefill side learns it with the request and publishes the first token and KV into it, and
    the decode side's `receive` waits for them. It exercises the concurrent path of the workers
    (decode started before prefill ends, a failed prefill ending the decode leg) without a GPU."""

    backend = "paired"
    concurrent = True

    def __init__(self, settings: KVHandoffSettings):
        self.timeout_s = settings.timeout_s

    def open(self, request_id: str) -> KVTicket:
        room = new_room()
        _ROOMS[room] = asyncio.get_running_loop().create_future()
        return KVTicket(request_id, self.backend, fields={"bootstrap_room": room})

    def bind(self, ticket: KVTicket) -> KVTicket:
        ticket.fields["bootstrap_host"] = "in-process"
        return ticket

    async def send(self, ticket: KVTicket, kv: Any) -> KVTicket:
        room = _ROOMS.get(ticket.fields["bootstrap_room"])
        if room is None or room.done():
            raise KVHandoffFailed(f"the decode side of {ticket.request_id} left its room")
        room.set_result(kv)
        ticket.num_tokens, ticket.nbytes = _size(kv.kv)
        return ticket

    async def receive(self, ticket: KVTicket, request: Any = None) -> PairedKV:
        room = _ROOMS.get(ticket.fields["bootstrap_room"])
        if room is None:
            raise KVHandoffFailed(f"no room is open for {ticket.request_id}")
        try:
            async with asyncio.timeout(self.timeout_s):  # (not `wait_for`: see above)
                return await asyncio.shield(room)
        except TimeoutError:
            raise KVHandoffFailed(f"KV for {ticket.request_id} not received within "
                                  f"{self.timeout_s}s", request_id=ticket.request_id) from None

    def release(self, ticket: KVTicket) -> None:
        room = _ROOMS.pop(ticket.fields.get("bootstrap_room"), None)
        if room is not None and not room.done():
            room.cancel()

    def holds(self, ticket: KVTicket) -> bool:
        return False  # the room is the decode side's


def open_rooms() -> int:
    """Rooms of the in-process paired handoff still open (tests: nothing is left behind)."""
    return len(_ROOMS)


def new_room() -> int:
    """A bootstrap room: random in [0, 2^63), as SGLang's router draws them."""
    return secrets.randbits(63)


# The backends whose decode side starts only after prefill has sent the KV.
SEQUENTIAL = ("local", "object_store")


def build_handoff(settings: KVHandoffSettings, engine: Any = None):
    """The handoff named by `settings.backend`; SGLang's comes from its engine adapter
    (`Engine.handoff()`), since the engine itself moves the KV."""
    if settings.backend == "local":
        return LocalHandoff()
    if settings.backend == "paired":
        return PairedHandoff(settings)
    if settings.backend == "object_store":
        return ObjectStoreHandoff(settings)
    if settings.backend == "sglang" and engine is not None and (own := engine.handoff()):
        return own
    raise ValueError(f"KV handoff backend {settings.backend!r} needs its engine: "
                     f"kv_handoff.backend sglang goes with engine.kind sglang")
