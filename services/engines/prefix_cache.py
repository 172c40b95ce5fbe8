"""Prefix caching for the CPU engines: the KV of full prompt blocks, reused by later prompts that
begin with the same blocks.

A prompt is cut into blocks of `block_tokens`; block i's key is a hash chain over the salt (the
tenant's, so one tenant's prompts never warm another's: a hit is visibly faster), every token id
up to the end of block i, and the digest of every image whose tokens begin by then (two images
of one size have the same ids but not the same KV). A lookup walks the chain from the first
block and stops at the first miss; every block it hands out is compared on its content (salt,
parent, token ids, image digests), so a hash collision can never hand out KV of other tokens.
Effort and tools sit where Mistral's format puts them (the system prompt, the tool list), so
prompts that differ there differ in the first blocks and never share.

Blocks are held up to `capacity_tokens`; the least recently used block no running prefill is
reading is evicted first. The KV itself is opaque here (the engine stores what it needs per
block).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_ROOT = b"small4-prefix-v1"


@dataclass
class Block:
    key: bytes
    parent: bytes
    salt: str
    token_ids: tuple[int, ...]
    images: tuple[bytes, ...]  # digests of the images beginning in this block
    kv: Any
    readers: int = 0


@dataclass
class Hit:
    """The cached leading blocks of a prompt; `release` when the prefill no longer reads them."""

    tokens: int
    blocks: list[Block] = field(default_factory=list)


@dataclass
class CacheStats:
    lookup_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0     # of which were served from the cache
    held_tokens: int = 0    # tokens of KV held now
    evicted_tokens: int = 0


class PrefixCache:
    """Blocks of prompt KV keyed by a salted hash chain, LRU-evicted above `capacity_tokens`."""

    def __init__(self, block_tokens: int, capacity_tokens: int):
        if block_tokens <= 0 or capacity_tokens < 0:
            raise ValueError("block_tokens must be positive and capacity_tokens not negative")
        self.block_tokens = block_tokens
        self.capacity_tokens = capacity_tokens
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.stats = CacheStats()

    # ---- keys ----------------------------------------------------------------------------
    def chain(self, token_ids: Sequence[int], salt: str,
              image_marks: dict[int, bytes] | None = None) -> list[tuple[bytes, bytes]]:
        """(parent key, key) of every full block of `token_ids`; `image_marks` maps the position
        where an image's tokens begin to the image's digest."""
        marks = image_marks or {}
        size, out = self.block_tokens, []
        parent = hashlib.sha256(_ROOT + salt.encode()).digest()
        data = _little_endian_u32(token_ids)
        for start in range(0, len(token_ids) - size + 1, size):
            h = hashlib.sha256(parent)
            h.update(data[4 * start:4 * (start + size)])
            for digest in self._images_in(marks, start):
                h.update(digest)
            key = h.digest()
            out.append((parent, key))
            parent = key
        return out

    def _images_in(self, marks: dict[int, bytes], start: int) -> tuple[bytes, ...]:
        return tuple(marks[p] for p in sorted(marks) if start <= p < start + self.block_tokens)

    # ---- lookup --------------------------------------------------------------------------
    def acquire(self, token_ids: Sequence[int], salt: str,
                image_marks: dict[int, bytes] | None = None, *, limit: int | None = None) -> Hit:
        """The longest run of cached leading blocks (at most `limit` tokens: a prefill must
        compute at least its last token), pinned against eviction until `release`."""
        marks = image_marks or {}
        size = self.block_tokens
        limit = len(token_ids) if limit is None else limit
        hit = Hit(0)
        for index, (parent, key) in enumerate(self.chain(token_ids, salt, marks)):
            start = index * size
            if start + size > limit:
                break
            block = self._blocks.get(key)
            if block is None or not self._same(block, parent, salt, token_ids[start:start + size],
                                               self._images_in(marks, start)):
                break
            block.readers += 1
            hit.blocks.append(block)
            hit.tokens += size
        self._touch([block.key for block in hit.blocks])
        self.stats.lookup_tokens += len(token_ids)
        self.stats.hit_tokens += hit.tokens
        return hit

    @staticmethod
    def _same(block: Block, parent: bytes, salt: str, token_ids: Sequence[int],
              images: tuple[bytes, ...]) -> bool:
        return (block.parent == parent and block.salt == salt and block.images == images
                and block.token_ids == tuple(int(t) for t in token_ids))

    def release(self, hit: Hit) -> None:
        for block in hit.blocks:
            block.readers -= 1
        hit.blocks = []

    # ---- insert --------------------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], salt: str, image_marks: dict[int, bytes] | None,
               kv_of_block) -> int:
        """Store the full blocks of `token_ids` that are not held yet; `kv_of_block(i)` gives
        block i's KV. Returns how many blocks were stored. The blocks already held (a hit's)
        are pinned and marked used with the rest of the chain: left out, they would be older
        than the new tail, so the room made for that tail could evict them and strand it."""
        marks = image_marks or {}
        size, stored, chain = self.block_tokens, 0, []
        try:
            for index, (parent, key) in enumerate(self.chain(token_ids, salt, marks)):
                start = index * size
                held = self._blocks.get(key)
                if held is not None and not self._same(held, parent, salt,
                                                       token_ids[start:start + size],
                                                       self._images_in(marks, start)):
                    break  # a colliding key: what follows would chain onto other tokens' KV
                if held is None:
                    if not self._make_room(size):  # never at the cost of this chain's head
                        break
                    self._blocks[key] = Block(
                        key, parent, salt, tuple(int(t) for t in token_ids[start:start + size]),
                        self._images_in(marks, start), kv_of_block(index))
                    self.stats.held_tokens += size
                    stored += 1
                self._blocks[key].readers += 1  # pinned while the rest of the chain goes in
                chain.append(key)
        finally:
            for key in chain:
                self._blocks[key].readers -= 1
            self._touch(chain)
        return stored

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain's blocks used, its head last: eviction takes a chain from its tail, so
        what stays of it is still a prefix that can hit (a lost head strands the rest)."""
        for key in reversed(keys):
            self._blocks.move_to_end(key)

    def _make_room(self, tokens: int) -> bool:
        """Evict unread blocks, least recently used first, until `tokens` more fit. Called per
        block stored: with room already it costs nothing; otherwise it walks only as far as it
        must (a copy of every key per block made a long prompt's insert quadratic in the
        blocks held: seconds for 256K tokens into a large cache, on the engine's loop)."""
        short = self.stats.held_tokens + tokens - self.capacity_tokens
        if short <= 0:
            return True
        if tokens > self.capacity_tokens:
            return False
        victims = []
        for key, block in self._blocks.items():
            if block.readers == 0:
                victims.append(key)
                short -= self.block_tokens
                if short <= 0:
                    break
        for key in victims:
            del self._blocks[key]
        self.stats.held_tokens -= len(victims) * self.block_tokens
        self.stats.evicted_tokens += len(victims) * self.block_tokens
        return short <= 0

    def clear(self) -> None:
        self._blocks = OrderedDict((k, b) for k, b in self._blocks.items() if b.readers)
        self.stats.held_tokens = len(self._blocks) * self.block_tokens


def prefix_cache_for(settings, role: str) -> PrefixCache | None:
    """The prefix cache an engine of `role` keeps under `settings` (`EngineSettings`): none for
    decode-only engines, which never run a prompt."""
    cache = settings.prefix_cache
    if not cache.enabled or role == "decode":
        return None
    capacity = (cache.capacity_tokens if cache.capacity_tokens is not None
                else settings.kv_capacity_tokens)
    return PrefixCache(cache.block_tokens, capacity)


def image_digest(pixels) -> bytes:
    """An image's identity for the prefix cache: its pixels, shape and type."""
    import numpy as np

    pixels = np.ascontiguousarray(np.asarray(pixels))
    h = hashlib.blake2b(repr((pixels.shape, pixels.dtype.str)).encode(), digest_size=32)
    h.update(memoryview(pixels).cast("B"))
    return h.digest()


def image_marks(token_ids: Sequence[int], digests: Sequence[bytes], img: int | None,
                end: int | None) -> dict[int, bytes]:
    """Where each image's tokens begin → its digest. With the `[IMG_END]` id known, image i
    begins at the first image token after image i-1's end; without it, every image's digest is
    marked at the first `[IMG]` (correct, but prompts then share only up to their first image)."""
    if not digests:
        return {}
    combined = hashlib.sha256(b"".join(digests)).digest()
    positions = [i for i, t in enumerate(token_ids) if t == img] if img is not None else []
    if not positions:
        return {0: combined}
    if end is None:
        return {positions[0]: combined}
    marks, inside, image = {}, False, 0
    for i, t in enumerate(token_ids):
        if t == end:
            inside = False
            continue
        if t == img and not inside:
            inside = True
            if image < len(digests):
                marks[i] = digests[image]
            image += 1
    if image != len(digests):  # ids and images disagree: the engine refuses the prompt anyway
        return {positions[0]: combined}
    return marks


def _little_endian_u32(token_ids: Sequence[int]) -> bytes:
    """The ids as 4-byte little-endian words, in one pass (not a `to_bytes` per id)."""
    return struct.pack(f"<{len(token_ids)}I", *token_ids)
