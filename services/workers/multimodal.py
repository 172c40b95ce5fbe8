"""The multimodal worker: a CPU deployment that turns a chat with images into prompt ids and
pixel tensors. The pixels go into Ray's object store here and travel to prefill by reference;
the ingress and decode only ever hold the references."""

from __future__ import annotations

from typing import Any

from services.context import RequestContext
from services.errors import Overloaded
from services.multimodal.budget import PromptBudget
from services.multimodal.preprocess import MultimodalPreprocessor
from services.kv.held import KEEPER
from services.multimodal.refs import PixelOwner, in_store, publish
from services.multimodal.refs import drain as drain_pixels
from services.multimodal.uniform import ImageTokens, uniform_image_sizes
from services.settings import MultimodalWorkerSettings
from services.telemetry import tracing
from services.telemetry.logs import configure_logging, serve_identity
from services.tokenizer import EncodedPrompt, load_tokenizer


DRAIN_MARGIN_S = 5.0


class MultimodalWorker:
    """Serves `encode` for requests that carry images."""

    role = "multimodal"

    def __init__(self, settings: MultimodalWorkerSettings):
        configure_logging(settings.telemetry.json_logs)  # its `small4.*` lines, as the ingress's
        self.preprocessor = MultimodalPreprocessor(
            load_tokenizer(settings.model.tokenizer_file()), settings.images,
            one_image_size=settings.one_image_size)
        self.one_image_size = settings.one_image_size
        self.image_tokens = ImageTokens.of(self.preprocessor.tokenizer)
        tracing.configure(settings.telemetry.tracing, role=self.role)
        self.replica = serve_identity().get("replica", "")
        self.max_held_bytes = settings.max_held_bytes
        self.drain_deadline_s = settings.drain_deadline_s

    def _room(self, nbytes: int = 0) -> None:
        """Refuse (503, retry later) pixels beyond what this replica may keep for requests in
        flight: slow streams of many large images must not fill the object store."""
        if KEEPER.nbytes + nbytes > self.max_held_bytes:
            raise Overloaded(f"the image service keeps {KEEPER.nbytes} bytes of pixels for "
                             f"requests in flight; with this request's {nbytes} that would "
                             f"pass its limit of {self.max_held_bytes}", retry_after=2.0)

    async def encode(self, ctx: RequestContext, messages: list[dict[str, Any]], effort: str,
                     tools: list[dict[str, Any]] | None,
                     budget: PromptBudget | None = None) -> EncodedPrompt:
        """The prompt of a chat with images; refused before decoding when its images' tokens
        (from their headers) do not fit `budget` (the context, the key's token quota)."""
        self._room()  # before any decoding
        with tracing.scope("multimodal", ctx.trace_headers,
                           **{"small4.request_id": ctx.request_id}) as span:
            # and before decoding, this request's own pixels from its images' headers
            prompt = await self.preprocessor.encode(messages, effort=effort, tools=tools,
                                                    deadline=ctx.deadline, budget=budget,
                                                    room=self._room)
            if self.one_image_size:
                prompt = uniform_image_sizes(prompt, self.image_tokens)
            span.set_attributes({"small4.images": len(prompt.images),
                                 "small4.prompt_tokens": len(prompt.ids),
                                 "small4.pixel_bytes": sum(a.nbytes for a in prompt.images)})
        # kept for the request's life (prefill retries and resumes fetch them again): until
        # the request service releases them, at the latest until the request's deadline
        left = ctx.remaining_s()
        self._room(sum(a.nbytes for a in prompt.images))
        prompt.images = publish(prompt.images, group=ctx.request_id,
                                **({} if left is None else {"hold_s": max(1.0, left)}))
        if in_store(prompt.images):
            prompt.pixels_owner = PixelOwner(self.replica, ctx.request_id)
        return prompt

    async def release(self, owner: PixelOwner) -> int:
        """The request of `owner` ended: let its pixels go (routed to the replica that keeps
        them, `services.workers.owner_router`); how many images were still kept."""
        return KEEPER.release_group(owner.request_id)

    async def held_images(self) -> int:
        """Images this replica keeps in the object store now."""
        return len(KEEPER)

    async def drain(self) -> None:
        """Before this replica goes (Serve awaits its `__del__` after its calls drained): the
        pixels it keeps for requests in flight (`refs.drain`), ending a little before Serve's
        force-kill at its `drain_deadline_s` (so its own shutdown still runs)."""
        await drain_pixels(max(0.0, self.drain_deadline_s - DRAIN_MARGIN_S))
