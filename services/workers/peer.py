"""Call a peer worker the same way whether it is a Ray Serve handle or an in-process object."""

from __future__ import annotations

from typing import Any


async def call(peer: Any, method: str, *args: Any) -> Any:
    """`await peer.method(*args)`, through `.remote()` when `peer` is a deployment handle."""
    target = getattr(peer, method)
    if hasattr(target, "remote"):
        return await target.remote(*args)
    return await target(*args)


def stream(peer: Any, method: str, *args: Any):
    """An async iterator over a streaming call on a handle or an in-process async generator."""
    if hasattr(peer, "options"):
        return getattr(peer.options(stream=True), method).remote(*args)
    return getattr(peer, method)(*args)


async def close_stream(iterator: Any) -> None:
    """Stop a stream from `stream()`: cancel the remote generator or close the local one."""
    if hasattr(iterator, "cancel"):
        iterator.cancel()
    elif hasattr(iterator, "aclose"):
        await iterator.aclose()
