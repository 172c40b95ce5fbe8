"""Fault injection for any engine, from settings (`engine.faults`): a prefill that fails and a
decode stream that breaks after some tokens, as when an engine process crashes. The errors are
`EngineUnavailable`, which the stack treats as a replica failure (retry prefill elsewhere,
resume decode elsewhere); a broken decode stream closes the inner stream first, so its KV is
freed as on any abort."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.engines.protocol import Engine, EngineRequest, EngineStats, PrefillResult, TokenChunk
from services.errors import EngineUnavailable
from services.settings import FaultSettings


class FaultyEngine:
    """Wraps an engine; every `prefill_fail_every`-th prefill fails, and every
    `decode_fail_every`-th decode stream fails after `decode_fail_after_tokens` tokens (one
    that ends sooner fails before its finish: its last tokens arrive, the finish never)."""

    def __init__(self, engine: Engine, faults: FaultSettings):
        self.engine, self.faults = engine, faults
        self.prefills = self.decodes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def prefill(self, request: EngineRequest) -> PrefillResult:
        self.prefills += 1
        every = self.faults.prefill_fail_every
        if every and self.prefills % every == 0:
            raise EngineUnavailable("injected fault: prefill engine failed")
        return await self.engine.prefill(request)

    async def decode(self, request: EngineRequest, first_token: int,
                     kv: Any) -> AsyncIterator[TokenChunk]:
        self.decodes += 1
        every = self.faults.decode_fail_every
        doomed = bool(every) and self.decodes % every == 0
        produced = 0
        stream = self.engine.decode(request, first_token, kv)
        try:
            async for chunk in stream:
                after = self.faults.decode_fail_after_tokens
                # a doomed stream dies after `after` tokens, or before its finish if sooner
                if doomed and (produced + len(chunk.token_ids) > after or chunk.finish_reason):
                    keep = min(len(chunk.token_ids), after - produced)
                    if keep > 0:
                        yield TokenChunk(chunk.token_ids[:keep],
                                         logprobs=chunk.logprobs and chunk.logprobs[:keep])
                    raise EngineUnavailable("injected fault: decode engine failed mid-stream")
                produced += len(chunk.token_ids)
                yield chunk
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        return await self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()
