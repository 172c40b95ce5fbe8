"""Prefix caching: a hit computes only the uncached suffix and changes nothing in the answer;
tenants, images, effort and tools never share KV they should not; collisions cannot hand out
KV of other tokens; eviction is LRU and spares blocks a prefill is reading."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest

from services.engines.prefix_cache import PrefixCache, image_marks
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.reference import images_to_encode
from tests.unit.test_reference_engine import GREEDY, disaggregated, make_engine, prompt_of

BLOCK = 16


def cached_engines(standin, tokenizer, **cache):
    prefix = {"block_tokens": BLOCK} | cache
    return (make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=32,
                        prefix_cache=prefix),
            make_engine(standin, tokenizer, "decode"))


def run(prefill, decode, ids, rid, *, salt="t", images=(), n=8):
    request = EngineRequest(rid, list(ids), SamplingParams(max_tokens=n, **GREEDY),
                            images=list(images), cache_salt=salt)
    first = {}

    async def go():
        original = prefill.prefill

        async def spy(req):
            result = await original(req)
            first["cached"] = result.cached_tokens
            return result

        prefill.prefill = spy
        try:
            return await disaggregated(prefill, decode, request)
        finally:
            prefill.prefill = original

    tokens = asyncio.run(go())
    return tokens, first["cached"]


def cold(standin, tokenizer, ids, images=(), n=8):
    prefill = make_engine(standin, tokenizer, "prefill", prefix_cache={"enabled": False})
    tokens, cached = run(prefill, make_engine(standin, tokenizer, "decode"), ids, "cold",
                         images=images, n=n)
    assert cached == 0
    return tokens


def test_a_hit_that_ends_mid_block_computes_the_suffix_and_answers_as_cold(standin, tokenizer):
    first = prompt_of(tokenizer, 40)
    second = first[:50] + prompt_of(tokenizer, 12, salt="x")[5:]  # shares 50: 3 blocks + 2
    prefill, decode = cached_engines(standin, tokenizer)
    assert run(prefill, decode, first, "a")[1] == 0
    tokens, cached = run(prefill, decode, second, "b")
    assert cached == 3 * BLOCK
    assert tokens == cold(standin, tokenizer, second)
    again, cached = run(prefill, decode, first, "c")  # the whole prompt but its last token
    assert cached == (len(first) - 1) // BLOCK * BLOCK
    assert again == cold(standin, tokenizer, first)
    stats = prefill.stats()
    assert stats.cache_hit_tokens == 3 * BLOCK + cached and stats.cache_tokens > 0


def test_tenants_never_share_unless_they_have_the_same_salt(standin, tokenizer):
    prompt = prompt_of(tokenizer, 30)
    prefill, decode = cached_engines(standin, tokenizer)
    run(prefill, decode, prompt, "a", salt="tenant-a")
    assert run(prefill, decode, prompt, "b", salt="tenant-b")[1] == 0
    assert run(prefill, decode, prompt, "c", salt="tenant-a")[1] > 0


def test_effort_and_tools_change_the_prefix_so_such_prompts_never_share(standin, tokenizer):
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(60))}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    variants = [tokenizer.encode_chat(messages, effort="none").ids,
                tokenizer.encode_chat(messages, effort="high").ids,
                tokenizer.encode_chat(messages, effort="none", tools=[tool]).ids]
    assert len({tuple(v) for v in variants}) == 3
    prefill, decode = cached_engines(standin, tokenizer)
    run(prefill, decode, variants[0], "none")
    for i, ids in enumerate(variants[1:]):
        shared = next(k for k, (x, y) in enumerate(zip(variants[0], ids)) if x != y)
        assert run(prefill, decode, ids, f"v{i}")[1] <= shared // BLOCK * BLOCK


def image_prompt(tokenizer, seed: int, words: int = 20):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = " ".join(f"w{i}" for i in range(words))
    return tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": text}]}], effort="none")


def test_two_images_of_one_size_share_only_the_text_before_them(standin, tokenizer):
    one, other = image_prompt(tokenizer, 1), image_prompt(tokenizer, 2)
    assert one.ids == other.ids  # same size: the ids cannot tell the images apart
    start = next(i for i, t in enumerate(one.ids) if t == standin.image_token_id)
    prefill, decode = cached_engines(standin, tokenizer)
    run(prefill, decode, one.ids, "one", images=one.images)
    tokens, cached = run(prefill, decode, other.ids, "other", images=other.images)
    assert cached == start // BLOCK * BLOCK
    assert tokens == cold(standin, tokenizer, other.ids, other.images)
    tokens, cached = run(prefill, decode, one.ids, "same", images=one.images)
    assert cached == (len(one.ids) - 1) // BLOCK * BLOCK > start
    assert tokens == cold(standin, tokenizer, one.ids, one.images)


def test_image_marks_find_where_each_image_begins():
    img, brk, end = 10, 12, 13
    ids = [1, 2, img, img, brk, img, img, end, 3, img, end, 4]
    assert image_marks(ids, [b"a", b"b"], img, end) == {2: b"a", 9: b"b"}
    conservative = image_marks(ids, [b"a", b"b"], img, None)
    assert list(conservative) == [2] and conservative[2] not in (b"a", b"b")
    assert image_marks(ids, [], img, end) == {}


def test_images_to_encode_skips_the_images_a_hit_covers():
    img, brk, end = 10, 12, 13
    ids = [1, img, img, brk, img, img, end, 2, img, img, brk, img, img, brk, img, img, end, 3]
    assert images_to_encode(ids, 2, 0, img, end) == (0, 0)
    assert images_to_encode(ids, 2, 3, img, end) == (0, 2)   # inside the first image
    assert images_to_encode(ids, 2, 8, img, end) == (1, 0)   # the first wholly cached
    assert images_to_encode(ids, 2, 12, img, end) == (1, 3)  # inside the second
    assert images_to_encode(ids, 2, 17, img, end) == (2, 0)  # both cached: none encoded
    assert images_to_encode(ids, 2, 12, img, None) == (0, 7)  # images not told apart
    assert images_to_encode(ids, 3, 12, img, end) == (0, 7)   # ids the images do not fill


def two_image_prompt(tokenizer, words: int, tail: str):
    """Text, a small image, text, a 112 x 112 image (16 slots and 4 more ids: it spans a block
    boundary), then `tail`."""
    from PIL import Image

    parts = [{"type": "text", "text": " ".join(f"w{i}" for i in range(words))}]
    for seed, (h, w) in enumerate([(56, 84), (112, 112)]):
        buf = io.BytesIO()
        pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "PNG")
        parts += [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}},
            {"type": "text", "text": tail if seed else "and then"}]
    return tokenizer.encode_chat([{"role": "user", "content": parts}], effort="none")


@pytest.fixture
def encoded(monkeypatch):
    """How many images went through the vision encoder."""
    import services.model.loader as loader

    calls, original = [], loader._image_features
    monkeypatch.setattr(loader, "_image_features",
                        lambda core, px: calls.append(px.shape) or original(core, px))
    return calls


def test_a_hit_encodes_only_the_images_with_an_uncached_slot(standin, tokenizer, encoded):
    """A prompt whose hit ends inside its second image runs the encoder on that image alone (its
    first slots' rows skipped), one that covers both images runs it on none; both answer as a
    cold prefill does."""
    end_id = tokenizer.special("[IMG_END]")
    img = standin.image_token_id
    for words in range(BLOCK):  # the text before that puts a block boundary inside image two
        first = two_image_prompt(tokenizer, words, "alpha " + "beta " * 2 * BLOCK)
        other = two_image_prompt(tokenizer, words, "omega " + "psi " * 2 * BLOCK)
        slots = [i for i, t in enumerate(first.ids) if t == img]
        two = [i for i in slots if i > first.ids.index(end_id)]
        common = next(i for i, (a, b) in enumerate(zip(first.ids, other.ids)) if a != b)
        if two[0] < common // BLOCK * BLOCK <= two[-1]:
            break
    else:
        pytest.fail("no text length puts a block boundary inside the second image")
    prefill = make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=32,
                          prefix_cache={"block_tokens": BLOCK})
    prefill.image_end_id = end_id
    decode = make_engine(standin, tokenizer, "decode")
    run(prefill, decode, first.ids, "a", images=first.images)
    assert len(encoded) == 2
    encoded.clear()
    tokens, cached = run(prefill, decode, other.ids, "b", images=other.images)
    assert cached == common // BLOCK * BLOCK
    assert encoded == [other.images[1].shape]  # the second image only
    encoded.clear()
    assert tokens == cold(standin, tokenizer, other.ids, other.images)
    encoded.clear()
    tokens, cached = run(prefill, decode, first.ids, "c", images=first.images)
    assert cached > slots[-1] and encoded == []
    assert tokens == cold(standin, tokenizer, first.ids, first.images)


class CollidingCache(PrefixCache):
    """Every block of every prompt gets the same key: a worst-case hash collision."""

    def chain(self, token_ids, salt, image_marks=None):
        n = len(token_ids) // self.block_tokens
        return [(b"p", b"same")] * n


def test_a_hash_collision_never_hands_out_kv_of_other_tokens():
    cache = CollidingCache(block_tokens=4, capacity_tokens=64)
    cache.insert([1, 2, 3, 4], "t", None, lambda i: "kv of 1 2 3 4")
    assert cache.acquire([1, 2, 3, 4, 5], "t").tokens == 4
    hit = cache.acquire([9, 9, 9, 9, 5], "t")
    assert hit.tokens == 0 and hit.blocks == []
    assert cache.acquire([1, 2, 3, 4, 5], "other tenant").tokens == 0


class FirstBlockCollides(PrefixCache):
    """Only the first block's key collides between prompts (a stand-in for a sha256 collision);
    the rest is the real chain from it."""

    def chain(self, token_ids, salt, image_marks=None):
        out = super().chain(token_ids, salt, image_marks)
        parent, fixed = b"first", []
        for i in range(len(out)):
            key = b"first" if i == 0 else bytes(
                token_ids[i * self.block_tokens:(i + 1) * self.block_tokens]) + parent
            fixed.append((out[0][0] if i == 0 else parent, key))
            parent = key
        return fixed


def test_an_insert_never_chains_onto_a_colliding_block():
    """B's first block collides with A's: B's next block, computed after B's own first, must
    not be stored under A's chain, where a prompt A0 + B1 would hit it."""
    cache = FirstBlockCollides(block_tokens=4, capacity_tokens=64)
    a0, b0, b1 = [1, 2, 3, 4], [9, 9, 9, 9], [5, 6, 7, 8]
    cache.insert(a0, "t", None, lambda i: "kv of a0")
    assert cache.insert(b0 + b1, "t", None, lambda i: f"kv of b{i} after b0") == 0
    hit = cache.acquire(a0 + b1 + [0], "t")
    assert [b.kv for b in hit.blocks] == ["kv of a0"]


def probe(cache: PrefixCache, ids: list[int]) -> int:
    """Tokens a lookup would reuse (the lookup is released at once)."""
    hit = cache.acquire(ids + [0], "")
    cache.release(hit)
    return hit.tokens


def test_eviction_is_least_recently_used_and_spares_blocks_being_read():
    cache = PrefixCache(block_tokens=4, capacity_tokens=8)
    a, b, c, d = [1] * 4, [2] * 4, [3] * 4, [4] * 4
    cache.insert(a, "", None, lambda i: "a")
    cache.insert(b, "", None, lambda i: "b")
    reading = cache.acquire(a + [0], "")  # a is read (and now most recent)
    cache.insert(c, "", None, lambda i: "c")  # evicts b, the least recent unread block
    assert (probe(cache, b), probe(cache, c)) == (0, 4)
    cache.insert(d, "", None, lambda i: "d")  # a is still read: c goes
    assert (probe(cache, c), probe(cache, d)) == (0, 4)
    held = cache.acquire(d + [0], "")
    assert cache.insert([5] * 4, "", None, lambda i: "e") == 0  # both read: nothing fits
    cache.release(reading)
    cache.release(held)
    assert probe(cache, a) == 4 and cache.stats.held_tokens == 8
    assert cache.stats.evicted_tokens == 8


def test_eviction_takes_a_chain_from_its_tail_so_what_stays_still_hits():
    """A prompt's blocks only hit from its first one on: evicting a chain's head would leave
    the rest held (counted, routed to) and never hit again."""
    cache = PrefixCache(block_tokens=4, capacity_tokens=16)
    a, b = list(range(100, 112)), list(range(200, 208))
    cache.insert(a, "", None, lambda i: i)
    cache.insert(b, "", None, lambda i: i)  # one block must go: a's last
    assert (probe(cache, a), probe(cache, b)) == (8, 8)
    assert cache.stats.held_tokens == 16
    longer = PrefixCache(block_tokens=4, capacity_tokens=16)
    stored = longer.insert(list(range(24)), "", None, lambda i: i)  # 6 blocks, room for 4
    assert stored == 4 and probe(longer, list(range(24))) == 16
    used = longer.acquire(list(range(8)) + [0], "")  # read again: its head is the most recent
    longer.release(used)
    longer.insert(list(range(50, 58)), "", None, lambda i: i)
    assert probe(longer, list(range(24))) == 8


def test_a_prompt_extending_a_cached_one_keeps_the_shared_head_before_its_new_tail():
    """As the engines call it: a hit, released once its KV is loaded, then the whole prompt
    inserted. Making room for the new tail must not evict the head it extends (that would
    strand the tail: held, counted, and never hit again)."""
    cache = PrefixCache(block_tokens=2, capacity_tokens=8)
    head = [1, 2, 3, 4]
    cache.insert(head, "", None, lambda i: i)
    longer = head + [5, 6, 7, 8, 10, 11]  # 5 blocks, room for 4
    hit = cache.acquire(longer + [0], "")
    assert hit.tokens == 4
    cache.release(hit)
    assert cache.insert(longer, "", None, lambda i: i) == 2  # the 5th would evict the head
    assert probe(cache, longer) == 8
    cache.insert([20, 21], "", None, lambda i: i)  # room made from the chain's tail
    assert probe(cache, longer) == 6


def test_a_hit_never_covers_the_last_prompt_token():
    cache = PrefixCache(block_tokens=4, capacity_tokens=64)
    cache.insert([1] * 8, "", None, lambda i: i)
    assert cache.acquire([1] * 8, "", limit=7).tokens == 4
    with pytest.raises(ValueError):
        PrefixCache(block_tokens=0, capacity_tokens=1)


def test_a_text_embedding_failure_on_a_hit_covering_every_image_is_not_blamed_on_them(
        standin, tokenizer):
    """Where the hit covers every image none is encoded: an embedding failure then is the
    engine's, not a 400 saying the vision encoder could not take the images."""
    from services.errors import InputRejected

    prompt = two_image_prompt(tokenizer, 3, "alpha " + "beta " * 2 * BLOCK)
    prefill = make_engine(standin, tokenizer, "prefill", prefill_chunk_tokens=32,
                          prefix_cache={"block_tokens": BLOCK})
    prefill.image_end_id = tokenizer.special("[IMG_END]")
    decode = make_engine(standin, tokenizer, "decode")
    run(prefill, decode, prompt.ids, "a", images=prompt.images)

    def broken(ids, images, skip_rows=0):
        assert images == []  # every image is in the hit
        raise RuntimeError("injected: the text embedding failed")

    prefill._embed = broken
    with pytest.raises(RuntimeError) as err:
        run(prefill, decode, prompt.ids, "b", images=prompt.images)
    assert not isinstance(err.value, InputRejected)
