"""Prefix caching and cache-aware routing through the real stack (Ray Serve, two prefill
replicas, the simulated engine's prefix cache, the openai client): conversations find their KV
turn after turn, tenants never find each other's, and the hit rate reaches Ray's metrics per
replica. The tests wait `SETTLE_S` between dependent requests (a router learns of other
processes' decisions every `routing.prefix.share_interval_s`), as a person reading the reply
or an agent running a tool does."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from services.settings import PrefixRoutingSettings
from tests.e2e.conftest import SIM_PROFILE, deployed
from tests.keyfiles import write_keys

pytestmark = pytest.mark.ray

KEYS = {"sk-prefix-a": {"name": "a", "tenant": "acme"},
        "sk-prefix-a2": {"name": "a2", "tenant": "acme"},
        "sk-prefix-b": {"name": "b", "tenant": "bravo"}}
SETTLE_S = 5 * PrefixRoutingSettings().share_interval_s
SYSTEM = "You are the build agent. " + " ".join(f"rule{i}" for i in range(300))


@pytest.fixture(scope="module")
def url(serve_url, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("prefixkeys") / "keys.yaml"
    write_keys(keys_file, KEYS)
    # Two prefill replicas per pool at 0.05 CPU each: the session's apps hold 1.2 of the test
    # Ray's 2 CPUs, and this app must fit beside them. One ingress replica: with two, a turn
    # whose router had not yet heard the other's last decision missed under the full suite's
    # load on 2 cores (CI); the sharing between routers is tested in test_prefix_exchange.py.
    pools = {name: pool | {"prefill": pool["prefill"] | {"replicas": 2, "num_cpus": 0.05}}
             for name, pool in SIM_PROFILE["pools"].items()}
    pools["fast"]["max_queue"] = 16
    profile = SIM_PROFILE | {"auth": {"enabled": True, "keys_file": str(keys_file)},
                             "pools": pools,
                             "ingress": {"num_cpus": 0.05},
                             "engine": SIM_PROFILE["engine"] | {
                                 "prefix_cache": {"block_tokens": 16}}}
    with deployed(profile, "prefix", serve_url) as base:
        yield base


def client(url: str, key: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def test_each_turn_finds_the_conversation_so_far_on_whichever_replica_holds_it(url):
    """Four conversations, three turns each, over two prefill replicas: from the second turn
    on, every prompt reuses at least the blocks of the one before it (the router sent it where
    they are; a blind router misses often)."""
    api = client(url, "sk-prefix-a")
    talks = {k: [{"role": "system", "content": f"{k} " + SYSTEM}] for k in range(4)}
    last_prompt = {}
    for turn in range(3):
        time.sleep(SETTLE_S)
        for k, messages in talks.items():
            messages.append({"role": "user", "content": f"turn {turn} of talk {k}"})
            reply = api.chat.completions.create(model="mistral-small-4", messages=messages,
                                                max_tokens=8)
            if turn:
                assert cached(reply) >= last_prompt[k] // 16 * 16 - 16, (k, turn)
            else:
                assert cached(reply) == 0
            last_prompt[k] = reply.usage.prompt_tokens
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})


def test_a_tenants_prompt_is_never_a_hit_for_another_tenant(url):
    messages = [{"role": "system", "content": "tenant test " + SYSTEM},
                {"role": "user", "content": "the same question"}]
    ask = dict(model="mistral-small-4", messages=messages, max_tokens=4)
    assert cached(client(url, "sk-prefix-a").chat.completions.create(**ask)) == 0
    assert cached(client(url, "sk-prefix-b").chat.completions.create(**ask)) == 0
    time.sleep(SETTLE_S)
    assert cached(client(url, "sk-prefix-a2").chat.completions.create(**ask)) > 0  # same tenant
    assert cached(client(url, "sk-prefix-b").chat.completions.create(**ask)) > 0


def test_streamed_usage_reports_cached_tokens_too(url):
    api = client(url, "sk-prefix-a")
    messages = [{"role": "system", "content": "stream " + SYSTEM},
                {"role": "user", "content": "hello"}]
    for attempt in range(2):
        time.sleep(SETTLE_S * attempt)
        stream = api.chat.completions.create(model="mistral-small-4", messages=messages,
                                             max_tokens=4, stream=True,
                                             stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage][-1]
        assert (usage.prompt_tokens_details.cached_tokens > 0) == (attempt == 1)


def test_hit_tokens_reach_the_metrics_per_replica(url, metrics_url):
    api = client(url, "sk-prefix-a")
    ask = {"model": "mistral-small-4", "max_tokens": 2, "messages": [
        {"role": "system", "content": "metrics " + SYSTEM}, {"role": "user", "content": "hi"}]}
    api.chat.completions.create(**ask)
    time.sleep(SETTLE_S)
    assert cached(api.chat.completions.create(**ask)) > 0  # a hit of its own, run alone too
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(metrics_url, timeout=10).text
        lines = [line for line in text.splitlines()
                 if line.startswith("ray_small4_prefix_cache_hit_tokens{")
                 and 'role="prefill"' in line and not line.rstrip().endswith(" 0.0")]
        if lines:
            break
        assert time.monotonic() < deadline, "no prefix cache hits in Ray's metrics"
        time.sleep(1)
    assert all('replica="' in line and 'replica="-"' not in line for line in lines)


def test_the_choices_of_one_request_each_find_a_prefill_replica(url):
    """The `n` choices of one request are prefilled at once from the ingress, and Serve gives
    every call made within a request the request's own internal id: a router that matched the
    replica it chose to a call by that id alone placed one choice and left the others waiting
    for their attempt's timeout (a minute), then failed them."""
    api = OpenAI(base_url=f"{url}/v1", api_key="sk-prefix-a", max_retries=0, timeout=20)
    for _ in range(3):
        reply = api.chat.completions.create(
            model="mistral-small-4", n=4, max_tokens=4,
            messages=[{"role": "system", "content": "n test " + SYSTEM},
                      {"role": "user", "content": "four answers, please"}])
        assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
        assert all(c.finish_reason for c in reply.choices)
