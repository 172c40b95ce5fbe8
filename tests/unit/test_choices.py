"""`n` choices (#18): each is its own decode stream of the one prompt, sampled independently;
usage counts the prompt once and every choice's tokens; a stream interleaves the choices'
chunks by `index`, each with its role chunk and its finish; the token quota is charged for
every choice. In process, simulated engine (its answers are fixed, so they can be compared
between the streamed and the whole answer)."""

from __future__ import annotations

import json

from tests.unit.test_http_surface import PROFILE, serve

BODY = {"model": "mistral-small-4", "max_tokens": 5, "ignore_eos": True,
        "messages": [{"role": "user", "content": "count"}]}


def post(profile, *bodies):
    return serve(profile, *[("POST", "/v1/chat/completions", {"json": b}) for b in bodies])


def events(reply) -> list[dict]:
    return [json.loads(line[6:]) for line in reply.text.splitlines()
            if line.startswith("data: {")]


def test_n_choices_are_answered_whole_and_streamed_with_usage_summed():
    one, three, streamed = post(PROFILE, BODY, BODY | {"n": 3}, BODY | {
        "n": 3, "stream": True, "stream_options": {"include_usage": True}})
    assert one.status_code == three.status_code == streamed.status_code == 200, three.text
    choices = three.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["finish_reason"] for c in choices] == ["length"] * 3
    usage, single = three.json()["usage"], one.json()["usage"]
    assert usage["prompt_tokens"] == single["prompt_tokens"]  # the prompt counts once
    assert usage["completion_tokens"] == 3 * single["completion_tokens"] == 15
    assert usage["total_tokens"] == usage["prompt_tokens"] + 15

    chunks = events(streamed)
    assert all(len(c["choices"]) == 1 for c in chunks[:-1]) and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 15
    for index in range(3):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
        assert mine[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content") or "" for c in mine)
        assert text == choices[index]["message"]["content"]
    assert streamed.text.rstrip().endswith("data: [DONE]")


def test_n_above_the_deployment_cap_is_refused_naming_n():
    capped = PROFILE | {"limits": {"max_n": 2}}
    ok, refused = post(capped, BODY | {"n": 2}, BODY | {"n": 3})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n" and "max_n" in refused.json()["error"][
        "message"]


def test_n_above_the_cap_is_a_400_before_the_token_quota_could_say_429():
    """A client's mistake is not a quota's retryable 429: the cap is checked first."""
    capped = PROFILE | {"limits": {"max_n": 2},
                        "auth": {"enabled": False, "default_quota": {"tokens_per_min": 200}}}
    refused, = post(capped, BODY | {"n": 5, "max_tokens": 100})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "n" and "retry-after" not in refused.headers


def test_every_choice_is_charged_to_the_token_quota():
    """max_tokens is reserved per choice: 4 × 60 does not fit 200 tokens/min, 1 × 60 does."""
    quota = PROFILE | {"auth": {"enabled": False, "default_quota": {"tokens_per_min": 200}}}
    limited, single = post(quota, BODY | {"n": 4, "max_tokens": 60},
                           BODY | {"max_tokens": 60})
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "tokens_per_min_exceeded"
    assert single.status_code == 200, single.text


def test_a_whole_answer_the_stack_failed_to_send_is_not_charged():
    """n=2, one choice's decode dies with no resume allowed: a non-streamed client gets a 503
    and nothing else, so the key is charged nothing (it paid prompt and tokens it never saw);
    a streamed one pays the tokens it was sent."""
    failing = PROFILE | {"limits": {"max_resumes": 0}, "engine": {
        "kind": "simulated", "simulated": {"decode_step_ms": 1, "output": "counter"},
        "faults": {"decode_fail_every": 2, "decode_fail_after_tokens": 3}},
        "auth": {"enabled": False, "default_quota": {"tokens_per_min": 100_000}}}
    spent = {}
    for stream in (False, True):
        seen = []

        def prepare(ingress):
            ingress.service.quotas.clock = lambda: 1000.0  # no refill
            seen.append(ingress)
        reply, = serve(failing, ("POST", "/v1/chat/completions", {"json": BODY | {
            "n": 2, "max_tokens": 10, "stream": stream}}), prepare=prepare)
        state, = seen[0].service.quotas.keys.values()
        spent[stream] = state.tokens.capacity - state.tokens.level
        assert state.charged == 0 and state.streams == 0
        if not stream:
            assert reply.status_code == 503, reply.text
    assert spent[False] == 0 and spent[True] > 0


def test_a_client_leaving_an_n_stream_frees_every_choice():
    """Closing the stream mid-answer stops all n decode streams: no sequence, KV or pool slot
    is left behind (the merge's pending reads are cancelled before the streams are closed)."""
    import asyncio

    from cluster.inprocess import build_inprocess
    from cluster.settings import parse_settings
    from services.api.service import Answer
    from services.guard.keys import ANONYMOUS

    slow = PROFILE | {"engine": {"kind": "simulated", "simulated": {
        "decode_step_ms": 20, "output": "counter"}}}
    service = build_inprocess(parse_settings(slow)).service
    body = BODY | {"n": 3, "stream": True, "max_tokens": 200}

    async def body_reader():
        return body

    async def go():
        answer = await service.chat(ANONYMOUS, {}, body_reader)
        assert isinstance(answer, Answer), answer
        stream = answer.events()
        seen = [await anext(stream) for _ in range(6)]
        busy = dict(service.in_flight)
        await stream.aclose()
        for _ in range(100):  # engines drop an aborted sequence on their next step
            legs = [s for d in service.pools.values()
                    for s in (d.engine.stats(), d.prefill.engine.stats())]
            if all((s.running, s.waiting, s.kv_tokens) == (0, 0, 0) for s in legs):
                break
            await asyncio.sleep(0.05)
        return seen, busy, legs

    seen, busy, legs = asyncio.run(go())
    assert sum(busy.values()) == 3  # three streams were in flight
    assert {json.loads(e[6:])["choices"][0]["index"] for e in seen} == {0, 1, 2}
    assert service.in_flight == {"fast": 0, "deep": 0}
    assert all((s.running, s.waiting, s.kv_tokens) == (0, 0, 0) for s in legs), legs


def _spent(service) -> float:
    """Tokens taken from the one key's bucket so far (its capacity minus its level)."""
    state, = service.quotas.keys.values()
    bucket = state.tokens
    bucket._fill(service.quotas.clock())
    return bucket.capacity - bucket.level


def test_prefills_sent_count_against_the_key_even_when_the_client_leaves_first():
    """A client that leaves just before its first token (or whose deadline passes there)
    spent the prefills: its grant keeps the prompt of every choice. Before, the whole charge
    came back, so long prompts cut at the last moment were free."""
    import asyncio

    from cluster.inprocess import build_inprocess
    from cluster.settings import parse_settings
    from services.guard.keys import ANONYMOUS

    slow = PROFILE | {"auth": {"enabled": False, "default_quota": {"tokens_per_min": 1e6}},
                      "engine": {"kind": "simulated", "simulated": {
                          "prefill_ms_per_token": 20, "output": "counter"}}}
    service = build_inprocess(parse_settings(slow)).service
    service.quotas.clock = lambda: 1000.0  # no refill while it runs
    body = BODY | {"n": 2, "max_tokens": 50}

    async def body_reader():
        return body

    async def go():
        task = asyncio.ensure_future(service.chat(ANONYMOUS, {}, body_reader))
        for _ in range(200):
            await asyncio.sleep(0.005)
            if any(s.stats().running or s.stats().waiting
                   for s in _prefill_engines(service)):
                break
        task.cancel()
        with __import__("pytest").raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    prompt = len(service.tokenizer.encode_chat(body["messages"], effort="none").ids)
    # every choice's prompt, none of the 2 × 50 reserved for the answers
    assert abs(_spent(service) - 2 * prompt) < 1, (_spent(service), prompt)


def _prefill_engines(service):
    return [client.prefill.engine for client in service.prefill_clients.values()]
