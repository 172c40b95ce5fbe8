"""One image size per request, for engines whose vision tower takes one (SGLang 0.5.23's
Mistral-native Pixtral): every image of the request is padded at the bottom and right with the
normalised mean colour (zero) to the largest height and width among them, and its `[IMG]`
block in the prompt is laid out for that size. Done where the prompt is encoded, so the ids
that prefill and decode send their engines, the context check and the token quota all see the
same prompt; it grows by the padding's tokens. Requests whose images already share a size,
and single images, are left exactly as mistral-common encoded them."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from services.errors import InvalidRequest
from services.tokenizer import EncodedPrompt


@dataclass(frozen=True)
class ImageTokens:
    """The ids of Pixtral's image layout: `[IMG]` per patch, `[IMG_BREAK]` ending each row
    but the last, `[IMG_END]` ending the image."""

    img: int
    brk: int
    end: int
    patch: int = 28  # pixels per `[IMG]`: patch 14, spatial merge 2

    @classmethod
    def of(cls, tokenizer) -> ImageTokens:
        return cls(tokenizer.special("[IMG]"), tokenizer.special("[IMG_BREAK]"),
                   tokenizer.special("[IMG_END]"))


def uniform_image_sizes(prompt: EncodedPrompt, tokens: ImageTokens) -> EncodedPrompt:
    """`prompt` with all its images of one size (see the module's docstring)."""
    if len({p.shape for p in prompt.images}) <= 1:
        return prompt
    height = max(p.shape[-2] for p in prompt.images)
    width = max(p.shape[-1] for p in prompt.images)
    padded = []
    for p in prompt.images:
        canvas = np.zeros((p.shape[0], height, width), np.float32)
        canvas[:, :p.shape[-2], :p.shape[-1]] = p
        padded.append(canvas)
    ids = relayout(prompt.ids, len(padded), tokens, height // tokens.patch, width // tokens.patch)
    return replace(prompt, ids=ids, images=padded)


def relayout(ids: list[int], images: int, tokens: ImageTokens, rows: int,
             cols: int) -> list[int]:
    """`ids` with every image block laid out as `rows` x `cols` patches."""
    block = ([tokens.img] * cols + [tokens.brk]) * rows
    block[-1] = tokens.end
    out, inside, found = [], False, 0
    for t in ids:
        if t == tokens.img and not inside:
            inside, found = True, found + 1
            out += block
        elif inside and t == tokens.end:
            inside = False
        elif not inside:
            out.append(t)
    if found != images:
        raise InvalidRequest(f"the prompt holds {found} image blocks for {images} images",
                             param="messages")
    return out


def image_rows(ids: list[int], tokens: ImageTokens) -> list[tuple[int, int]]:
    """(first, last) position of each run of `[IMG]` (inclusive): a row of an image's patches,
    as SGLang's own processor finds placeholders (`get_mm_items_offset`). Every position in an
    offset becomes a placeholder for an embedding; the `[IMG_BREAK]` between rows has none.
    Only runs inside an image's block (up to its `[IMG_END]`) count: an `[IMG]` sampled into
    a resumed leg's prompt is text there, with no embedding of its own."""
    runs, block, start = [], [], None
    for i, t in enumerate(ids):
        if t == tokens.img and start is None:
            start = i
        elif t != tokens.img and start is not None:
            block.append((start, i - 1))
            start = None
        if t == tokens.end:  # the block ends: its rows are an image's
            runs += block
            block = []
        elif t != tokens.img and t != tokens.brk:  # text: rows not closed by one are not
            block = []
    return runs


def image_offsets(ids: list[int], tokens: ImageTokens) -> list[tuple[int, int]]:
    """(first, last) position of each image's block before its `[IMG_END]` (inclusive)."""
    spans, start = [], None
    for i, t in enumerate(ids):
        if t == tokens.img and start is None:
            start = i
        elif t == tokens.end and start is not None:
            spans.append((start, i - 1))
            start = None
    return spans
