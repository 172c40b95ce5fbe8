"""A request to an in-process stack's ASGI app, with no network (httpx's ASGI transport)."""

from __future__ import annotations

import asyncio

import httpx


def post_chat(ingress, body: dict, timeout: float = 30.0) -> httpx.Response:
    """POST `body` to `ingress`'s `/v1/chat/completions`; the reply, read whole."""
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(
                app=ingress.build_asgi_app()), base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=body, timeout=timeout)

    return asyncio.run(go())
