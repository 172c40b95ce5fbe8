"""Chat messages with images → prompt ids (with `[IMG]`/`[IMG_BREAK]`/`[IMG_END]` expanded) and
CHW float32 pixels, exactly as mistral-common encodes them.

mistral-common does the image work (RGB with alpha on white, resize to the 14-px grid within
1540 px, CLIP normalisation, token layout); what it lacks is done here: fetching under a policy,
refusing bad input from its headers before decoding any of it, bounding what decoding costs,
and naming the offending message part in every error.

Decoding and encoding run on a small pool of threads, never on the event loop, so an expensive
image cannot stall the replica's other requests or its health checks; the request's deadline
is enforced while it waits for a thread and while it decodes (`services.multimodal.decode`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from services.errors import DeadlineExceeded, InvalidRequest
from services.multimodal.decode import DecodeStopped, decode_image
from services.multimodal.budget import PromptBudget
from services.multimodal.header import ImageHeader, check_request_pixels, read_header
from services.multimodal.sources import data_url_bytes, fetch_url_bytes
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

    def __init__(self, tokenizer: PromptTokenizer, settings: ImageSettings, *,
                 one_image_size: bool = False):
        self.tokenizer = tokenizer
        self.settings = settings
        # the request's images will all be laid out at the largest size among them
        # (`services.multimodal.uniform`): what they take is counted so from their headers
        self.one_image_size = one_image_size
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="image-decode",
                                       initializer=_below_other_work,
                                       initargs=(settings.decode_niceness,))

    async def encode(self, messages: list[dict[str, Any]], *, effort: str,
                     tools: list[dict[str, Any]] | None = None,
                     deadline: float | None = None,
                     budget: PromptBudget | None = None,
                     room: Callable[[int], None] | None = None) -> EncodedPrompt:
        """The encoded chat; `deadline` (epoch seconds) bounds fetching, waiting and decoding.
        Cheapest first: the request's own images (data URLs) are checked from their headers
        before any URL is fetched, and every header, with the tokens the images will take
        against `budget` and the bytes their pixels will take against `room` (which raises
        where they do not fit), before any image is decoded."""
        parts = image_parts(messages)
        if len(parts) > self.settings.max_images:
            i, j, _ = parts[self.settings.max_images]
            raise InvalidRequest(f"at most {self.settings.max_images} images per request",
                                 param=f"messages.{i}.content.{j}")
        params = [_param(i, j) for i, j, _ in parts]
        stopped = threading.Event()

        def stop() -> bool:
            return stopped.is_set() or (deadline is not None and time.time() > deadline)

        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                inline = await self._in_pool(self._read_inline, parts, params)
                urls = [(url, p) for (_, _, url), p, (data, _) in zip(parts, params, inline)
                        if data is None]
                fetched = iter(await _fetch_all(urls, self.settings, deadline))
                raw = [next(fetched) if data is None else data for data, _ in inline]
                headers = await self._in_pool(self._headers, raw, [h for _, h in inline],
                                              params)
                if budget is not None:
                    budget.check(self._prompt_tokens(headers))
                if room is not None:
                    room(self.pixel_bytes(headers))
                return await self._in_pool(self._decode_and_encode, messages, parts, raw,
                                           effort, tools, stop)
        except (TimeoutError, DecodeStopped):
            raise _late() from None
        finally:
            stopped.set()

    async def _in_pool(self, fn, *args):
        """`fn(*args)` on a decode thread."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def _read_inline(self, parts, params) -> list[tuple[bytes | None, ImageHeader | None]]:
        """(bytes, checked header) of each data-URL image; (None, None) for a URL to fetch."""
        inline = []
        for (_, _, url), param in zip(parts, params):
            if url[:5].lower() == "data:":  # a URL's scheme is case-insensitive
                data = data_url_bytes(url, self.settings, param)
                inline.append((data, read_header(data, self.settings, param)))
            else:
                inline.append((None, None))
        return inline

    def _headers(self, raw: list[bytes], known: list[ImageHeader | None],
                 params: list[str]) -> list[ImageHeader]:
        """Every image's header (those not yet read, read and checked), checked together."""
        headers = [header or read_header(data, self.settings, p)
                   for data, header, p in zip(raw, known, params)]
        check_request_pixels(headers, params, self.settings)
        limit = self.settings.max_pixels_per_token
        for header, param in zip(headers, params):
            tokens = self._prompt_tokens([header])
            if header.pixels > limit * tokens:
                raise InvalidRequest(
                    f"image is {header.width}x{header.height} pixels for {tokens} prompt "
                    f"tokens once resized: over {limit} pixels per token "
                    "(images.max_pixels_per_token), it costs far more to decode than the "
                    "model sees of it; send it smaller, or a long image cut in parts",
                    param=param)
        return headers

    def _grids(self, headers: list[ImageHeader]) -> list[set[tuple[int, int]]]:
        """Each image's (columns, rows) of `[IMG]` patches: both ways where an EXIF
        orientation its header cannot tell may turn it."""
        return [{self.tokenizer.image_grid(*((h.height, h.width) if turn
                                              else (h.width, h.height)))
                 for turn in ((False, True) if h.turned is None else (h.turned,))}
                for h in headers]

    def pixel_bytes(self, headers: list[ImageHeader]) -> int:
        """The fewest bytes the decoded pixels of these headers' images take (CHW float32,
        resized to their patch grids), before any padding to one size."""
        config = self.tokenizer.image_config
        side = config.image_patch_size * config.spatial_merge_size
        return 3 * 4 * side * side * sum(min(cols * rows for cols, rows in turns)
                                         for turns in self._grids(headers))

    def _prompt_tokens(self, headers: list[ImageHeader]) -> int:
        """The fewest prompt tokens the images of these headers can take together (an EXIF
        orientation turns one, swapping its rows and columns; both ways where its header
        cannot tell): each its own grid, or, with
        one image size per request, every image at the largest columns and rows among them
        (padding included: it is encoded, computed and charged as the prompt it is)."""
        grids = self._grids(headers)
        if not self.one_image_size or len(headers) < 2:
            return sum(min(rows * (cols + 1) for cols, rows in turns) for turns in grids)
        return len(headers) * min(
            max(r for _, r in pick) * (max(c for c, _ in pick) + 1)
            for pick in itertools.product(*grids))

    def _decode_and_encode(self, messages, parts, raw, effort, tools, stop) -> EncodedPrompt:
        """Each image decoded, then the chat encoded (a pool thread)."""
        images = {}
        for (i, j, _), data in zip(parts, raw):
            images[(i, j)] = decode_image(data, self.settings, _param(i, j), stop)
        if stop():
            raise DecodeStopped
        return self.tokenizer.encode_chat(messages, effort=effort, tools=tools, images=images)


async def _fetch_all(urls: list[tuple[str, str]], settings: ImageSettings,
                     deadline: float | None) -> list[bytes]:
    """The bytes behind every (url, param) at once; the first failure stops the others."""
    tasks = [asyncio.ensure_future(fetch_url_bytes(url, settings, param, deadline))
             for url, param in urls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _below_other_work(niceness: int) -> None:
    """Run the calling decode thread `niceness` below the rest of the process and node (Linux
    niceness is per thread): when cores are short, requests that only need a moment of CPU,
    and health checks, go first; on idle cores it changes nothing."""
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + niceness))
    except (AttributeError, OSError):
        return  # no per-thread priorities here: decode at the process's own


def _param(i: int, j: int) -> str:
    return f"messages.{i}.content.{j}.image_url"


def _loop_time(deadline: float | None) -> float | None:
    """The event loop's clock reading at wall-clock `deadline`."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.time())


def _late() -> DeadlineExceeded:
    return DeadlineExceeded("the request's deadline passed while its images were being "
                            "fetched or decoded (x-request-timeout or limits.request_timeout_s)",
                            param="x-request-timeout")
