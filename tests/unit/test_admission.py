"""Admission control: with every pool at `max_queue` and nowhere to spill, a request gets a 503
with `Retry-After` at once instead of waiting without bound; room frees when requests end
(in-process workers, simulated engine with 1 s answers)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from cluster.inprocess import build_inprocess
from cluster.settings import parse_settings
from services.errors import InvalidRequest, RateLimited
from services.guard.keys import Principal
from services.guard.quotas import Quotas
from services.settings import QuotaSettings
from services.telemetry import metrics

PROFILE = {
    "profile": "admission",
    "auth": {"enabled": False},
    "model": {"context_length": 4096},
    "engine": {"kind": "simulated", "simulated": {"decode_step_ms": 50, "output": "counter"}},
    "pools": {"fast": {"effort": "none", "max_queue": 1},
              "deep": {"effort": "high", "max_queue": 1}},
}
BODY = {"model": "mistral-small-4", "max_tokens": 20,
        "messages": [{"role": "user", "content": "count"}]}


async def admitted(ingress, streams: int, timeout_s: float = 10.0) -> None:
    """Wait (with a deadline) until the pools hold `streams` decode streams: the requests sent
    before are admitted, whatever the machine's speed (a fixed sleep assumed it)."""
    async with asyncio.timeout(timeout_s):
        while sum(ingress.service.in_flight.values()) < streams:
            await asyncio.sleep(0.01)


def test_full_pools_answer_503_with_retry_after_then_admit_again():
    ingress = build_inprocess(parse_settings(PROFILE))
    app = ingress.build_asgi_app()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            post = lambda: client.post("/v1/chat/completions", json=BODY, timeout=30)  # noqa: E731
            # two in flight fill both pools (the second spills over to deep)
            busy = [asyncio.ensure_future(post()) for _ in range(2)]
            await admitted(ingress, 2)
            shed = metrics.REQUESTS.value(tenant="all", pool="none", status="503")
            refused = await post()
            shed = metrics.REQUESTS.value(tenant="all", pool="none", status="503") - shed
            answered = await asyncio.gather(*busy)
            return refused, shed, answered, await post()

    refused, shed, answered, after = asyncio.run(scenario())
    assert refused.status_code == 503, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "overloaded_error"
    # what the error-rate alert counts (the refusal has no pool and no latency sample)
    assert shed == 1
    assert sorted(r.headers["x-small4-pool"] for r in answered) == ["deep", "fast"]
    assert [r.status_code for r in answered] == [200, 200]
    assert after.status_code == 200


def test_n_choices_take_n_streams_of_the_pool_and_of_the_key():
    """Each choice is its own decode stream (`in_flight` counts it so): a request of n must
    find n places in a pool's queue (an idle pool takes any n) and n of its key's stream
    slots, not one of each -- else one request of 16 passed a queue of 2 and a key of 1."""
    profile = PROFILE | {"limits": {"max_n": 4},
                         "pools": {"fast": {"effort": "none", "max_queue": 3},
                                   "deep": {"effort": "high", "max_queue": 3}}}
    ingress = build_inprocess(parse_settings(profile))
    app = ingress.build_asgi_app()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            def post(n):
                return client.post("/v1/chat/completions", json=BODY | {"n": n}, timeout=30)
            alone = await post(4)  # an idle pool: any n
            busy = asyncio.ensure_future(post(2))
            await admitted(ingress, 2)
            seen = dict(ingress.service.in_flight)
            too_many = await post(2)  # 2 + 2 > 3 in fast, and deep takes 2 + 0: spilled
            return alone, seen, too_many, await busy

    alone, seen, spilled, busy = asyncio.run(scenario())
    assert alone.status_code == busy.status_code == 200 and len(alone.json()["choices"]) == 4
    assert seen["fast"] == 2
    assert spilled.status_code == 200 and spilled.headers["x-small4-pool"] == "deep"


def test_a_request_goes_to_a_pool_of_its_effort_with_room_for_its_choices():
    """The least loaded pool of the effort may lack room for n streams where a fuller but
    larger one has it: that one is taken, not another effort's (or a 503)."""
    from services.routing import choose_pool
    from services.settings import PoolSettings, RoutingSettings

    pools = {"big": PoolSettings(effort="none", max_queue=100),
             "small": PoolSettings(effort="none", max_queue=4),
             "deep": PoolSettings(effort="high", max_queue=100)}
    routing = RoutingSettings(effort_map={"none": "none", "high": "high"}, spillover=False)
    in_flight = {"big": 90, "small": 3, "deep": 0}
    assert choose_pool("none", pools, in_flight, routing, n=8).pool == "big"
    assert choose_pool("none", pools, in_flight, routing, n=1).pool == "small"


def test_a_keys_stream_limit_counts_every_choice_and_a_requota_refunds_only_its_bucket():
    """n choices hold n of the key's stream slots. A grant charged while the key had no token
    quota is refunded nothing into the bucket a re-quota created meanwhile (it took nothing
    from it): 190k tokens were admitted at one instant on a key re-quoted to 100k/min."""
    quotas = Quotas(QuotaSettings(max_concurrent_streams=3), clock=lambda: 0.0)
    key = Principal("k", "t", key_id="a" * 64)
    first = quotas.admit_request(key)
    quotas.take_streams(key, first, 3)
    with pytest.raises(RateLimited) as err:
        quotas.admit_request(key)
    assert err.value.code == "concurrency_limit_exceeded"
    quotas.release(first, 0)
    grant = quotas.admit_request(key)
    with pytest.raises(InvalidRequest) as err:  # more than the key may ever hold: a 400
        quotas.take_streams(key, grant, 4)  # (a 429 of 1 s, retried for ever)
    assert "never" in str(err.value) and err.value.param == "n" and err.value.status == 400
    quotas.take_streams(key, grant, 2)  # 2 of 3 free: taken
    other = quotas.admit_request(key)  # the third slot
    with pytest.raises(RateLimited) as err:
        quotas.take_streams(key, other, 3)
    assert "never" not in str(err.value) and err.value.retry_after == 1.0  # busy, not never
    quotas.release(other, 0)
    quotas.release(grant, 0)
    assert quotas.keys[key.ident].streams == 0
    once_a_second = Principal("k", "t", QuotaSettings(requests_per_s=1), key_id="c" * 64)
    pair = quotas.admit_request(once_a_second)
    quotas.take_streams(once_a_second, pair, 2)  # its own request token, not a second one
    assert pair.streams == 2

    unlimited = Principal("k", "t", QuotaSettings(), key_id="b" * 64)
    old = quotas.admit_request(unlimited)
    quotas.charge(old, 130_000)
    requoted = Principal("k", "t", QuotaSettings(tokens_per_min=100_000), key_id="b" * 64)
    new = quotas.admit_request(requoted)
    quotas.charge(new, 95_000)
    quotas.release(old, 1_000)  # ends early: its unused 129k came from no bucket
    with pytest.raises(RateLimited):
        quotas.charge(quotas.admit_request(requoted), 95_000)


def test_a_key_out_of_tokens_is_refused_before_its_body_is_read():
    """The cheap checks before the body include an empty token bucket: a key that cannot pay
    one token had its body read and parsed first (up to a second of the loop per 100 MB)."""
    quotas = Quotas(QuotaSettings(), clock=lambda: 0.0)
    key = Principal("k", "t", QuotaSettings(tokens_per_min=1000), key_id="d" * 64)
    quotas.charge(quotas.admit_request(key), 1000)
    with pytest.raises(RateLimited) as err:
        quotas.admit_request(key)
    assert "tokens" in str(err.value)
    assert quotas.keys[key.ident].streams == 1  # the refused one took no stream slot


PNG_1X1 = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4"
           "z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def image_body(text: str) -> dict:
    return BODY | {"messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": PNG_1X1}}]}]}


def encodes_seen(ingress) -> list:
    """The calls that reach the image service (the in-process worker, wrapped)."""
    worker, seen = ingress.service.multimodal, []
    encode = worker.encode

    async def counted(*args, **kwargs):
        seen.append(args)
        return await encode(*args, **kwargs)

    worker.encode = counted
    return seen


def test_a_full_stack_sheds_before_any_image_is_encoded():
    """With every pool at its queue limit the 503 comes before the costly steps: no image is
    fetched or decoded (nor a prompt tokenised, nor a grammar compiled) for a request that
    would be shed after them."""
    ingress = build_inprocess(parse_settings(PROFILE))
    seen, app = encodes_seen(ingress), ingress.build_asgi_app()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            post = lambda body: client.post("/v1/chat/completions", json=body,  # noqa: E731
                                            timeout=30)
            busy = [asyncio.ensure_future(post(BODY)) for _ in range(2)]
            await admitted(ingress, 2)
            refused = await post(image_body("what is this?"))
            await asyncio.gather(*busy)
            return refused, len(seen), await post(image_body("what is this?"))

    refused, encoded_then, after = asyncio.run(scenario())
    assert refused.status_code == 503, refused.text
    assert encoded_then == 0
    assert after.status_code == 200 and len(seen) == 1


def test_an_image_request_whose_text_outgrows_the_context_is_refused_before_the_image_service():
    """Its text is counted with an early stop, as a text request's is: 300 KB of text beside
    one image is a 400 from the ingress, never a whole encoding in the image service."""
    ingress = build_inprocess(parse_settings(PROFILE))
    seen, app = encodes_seen(ingress), ingress.build_asgi_app()

    async def ask(text: str):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            return await client.post("/v1/chat/completions", json=image_body(text), timeout=30)

    refused = asyncio.run(ask("lorem ipsum dolor " * 17_000))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert seen == []
    assert asyncio.run(ask("what is this?")).status_code == 200 and len(seen) == 1


def test_a_grammar_waiting_for_a_compile_slot_keeps_the_requests_deadline():
    """Compiles run a few at a time per replica; a structured request queued behind them
    still ends at its own deadline (504) instead of holding its stream slot past it."""
    reference = {k: v for k, v in PROFILE.items() if k != "engine"}  # it samples logits
    ingress = build_inprocess(parse_settings(reference | {"limits": {
        "max_concurrent_compiles": 1}}))
    app = ingress.build_asgi_app()
    body = BODY | {"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}}

    async def scenario():
        await ingress.service._compiling.acquire()  # a long compile holds the only slot
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://small4") as client:
            post = lambda: client.post("/v1/chat/completions", json=body,  # noqa: E731
                                       headers={"x-request-timeout": "0.5"}, timeout=30)
            started = asyncio.get_running_loop().time()
            late = await post()
            waited = asyncio.get_running_loop().time() - started
            ingress.service._compiling.release()
            # a request whose deadline is gone by then takes no free slot, starts no compile
            gone = await client.post("/v1/chat/completions", json=body, timeout=30,
                                     headers={"x-request-timeout": "0.000001"})
            return late, waited, (gone, len(compiles)), await post()

    compiles = []
    grammar = ingress.service.guidance.grammar
    ingress.service.guidance.grammar = lambda *a: compiles.append(a) or grammar(*a)
    late, waited, (gone, compiled), after = asyncio.run(scenario())
    assert late.status_code == 504, late.text
    assert late.json()["error"]["param"] == "x-request-timeout"
    assert waited < 10  # its own deadline, not the slot's release
    assert gone.status_code == 504 and compiled == 0
    assert after.status_code == 200 and len(compiles) == 1




def test_a_pixel_release_waits_for_a_busy_image_service_until_the_deadline(monkeypatch):
    """A release queues for a slot of the replica that keeps the pixels, behind its encodes:
    given up after a few seconds, it left them held (and counted against the replica's
    `max_held_bytes`) until the request's deadline. It is tried until that deadline (and at
    least `RELEASE_S`)."""
    import time

    import services.api.service as service_module
    from services.multimodal.refs import PixelOwner

    monkeypatch.setattr(service_module, "RELEASE_S", 0.2)
    service = build_inprocess(parse_settings(PROFILE)).service
    released = []

    async def busy_release(owner):  # its turn comes after 0.6 s of other encodes
        await asyncio.sleep(0.6)
        released.append(owner.request_id)

    service.multimodal.release = busy_release

    async def scenario():
        service.release_pixels(PixelOwner("replica", "within"), time.time() + 5)
        service.release_pixels(PixelOwner("replica", "past"), time.time() - 1)
        await asyncio.sleep(1.0)

    asyncio.run(scenario())
    # the first, within its deadline, waited for its turn; the second, past its deadline
    # (its pixels already gone), was given RELEASE_S only
    assert released == ["within"]


def test_a_text_request_refused_after_its_encoding_pays_its_texts_least():
    """The least a text can cost (its bytes over the longest token's) is charged before it is
    tokenised; a charge the key cannot pay once the prompt is counted exactly (a 429) refunded
    it all, so a key short of tokens could have 64 KB prompts tokenised for nothing, again and
    again. What the encoding cost is kept: the text's least, never its max_tokens."""
    import random
    import string

    from services.api.plan import text_floor
    from services.api.schemas import parse_chat_request
    from tests.asgi import post_chat

    ingress = build_inprocess(parse_settings(PROFILE | {"auth": {
        "enabled": False, "default_quota": {"tokens_per_min": 3000}}}))
    service = ingress.service
    service.quotas.clock = lambda: 1000.0  # no refill
    text = "".join(random.Random(3).choices(string.ascii_letters + string.punctuation, k=3000))
    body = BODY | {"max_tokens": 800, "messages": [{"role": "user", "content": text}]}
    least = text_floor(parse_chat_request(body, service.settings.limits.max_messages),
                       service.token_bytes)
    tokens = len(service.tokenizer.encode_chat(body["messages"], effort="none").ids)
    assert least + 800 < 3000 < tokens + 800  # the floor can be paid, the prompt cannot

    reply = post_chat(ingress, body)
    assert reply.status_code == 429, reply.text
    state, = service.quotas.keys.values()
    assert state.charged == 0 and state.tokens.level == 3000 - least
