"""Chat messages with images → prompt ids (with `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` expanded) and
CHW float32 pixels, exactly as mistral-common encodes them.

mistral-common does the image work (RGB with alpha on white, resize to the 14-px grid within
1540 px, CLIP normalisation, token layout); what it lacks is done here: fetching under a policy,
refusing bad input before decoding it, and naming the offending message part in every error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from services.errors import InvalidRequest
from services.multimodal.decode import decode_image
from services.multimodal.sources import image_bytes
from services.settings import ImageSettings
from services.tokenizer import EncodedPrompt, PromptTokenizer


def image_parts(messages: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    """(message index, part index, url) of every `image_url` part, in order."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            found += [(i, j, part["image_url"]["url"]) for j, part in enumerate(content)
                      if part.get("type") == "image_url"]
    return found


class MultimodalPreprocessor:
    """Fetches, checks and decodes a request's images, then encodes the chat with them."""

    def __init__(self, tokenizer: PromptTokenizer, settings: ImageSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.in_flight = 0

    async def encode(self, messages: list[dict[str, Any]], *, effort: str,
                     tools: list[dict[str, Any]] | None = None) -> EncodedPrompt:
        parts = image_parts(messages)
        if len(parts) > self.settings.max_images:
            i, j, _ = parts[self.settings.max_images]
            raise InvalidRequest(f"at most {self.settings.max_images} images per request",
                                 param=f"messages.{i}.content.{j}")
        self.in_flight += 1
        try:
            raw = await asyncio.gather(*(image_bytes(url, self.settings, _param(i, j))
                                         for i, j, url in parts))
            args = (messages, parts, raw, effort, tools)
            if self.in_flight == 1:
                # Alone: decode on this thread. A hop to a worker thread costs 4-6 ms per 1080p
                # image here (measured), more than the overlap it buys with nothing else to do.
                return self._decode_and_encode(*args)
            return await asyncio.to_thread(self._decode_and_encode, *args)
        finally:
            self.in_flight -= 1

    def _decode_and_encode(self, messages, parts, raw, effort, tools) -> EncodedPrompt:
        images = {(i, j): decode_image(data, self.settings, _param(i, j))
                  for (i, j, _), data in zip(parts, raw)}
        return self.tokenizer.encode_chat(messages, effort=effort, tools=tools, images=images)


def _param(i: int, j: int) -> str:
    return f"messages.{i}.content.{j}.image_url"
