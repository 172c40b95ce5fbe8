"""The ingress replica dies (SIGKILL) or is stopped (SIGTERM) while it streams: the client's
stream finishes, or ends with an SSE error event, never with a bare close; the next request is
answered once Serve has replaced the replica."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from edge_kit import auth, chat_body, wait_health

pytestmark = pytest.mark.ray


def _ingress_pid() -> int:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "adv-edge" in a["name"] and "ingress" in a["name"]]
    assert len(names) == 1, names
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_stream_cut_by_the_ingress_stopping_ends_with_done_or_an_error_event(edge, sig):
    pid = _ingress_pid()
    events: list[str] = []
    body = chat_body(stream=True, max_tokens=2000,  # echo: the prompt back, ~6 s
                     messages=[{"role": "user", "content": "tell a long story " * 300}])
    with httpx.stream("POST", f"{edge}/v1/chat/completions", json=body, headers=auth("beta"),
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if len(events) == 3:
                os.kill(pid, sig)
    print(f"\n{sig.name}: {len(events)} events, the last {events[-1][:120]}")
    assert len(events) > 3
    if sig == signal.SIGKILL or events[-1] != "[DONE]":
        error = json.loads(events[-1])["error"]
        assert error["code"] == "stream_interrupted" and error["type"] == "overloaded_error"
    wait_health(edge, timeout=120)
    deadline = time.time() + 60
    while time.time() < deadline:  # Serve routes to the new replica within a few seconds
        again = httpx.post(f"{edge}/v1/chat/completions", json=chat_body(),
                           headers=auth("beta"), timeout=30)
        if again.status_code == 200:
            break
        assert again.headers["content-type"].startswith("application/json"), again.text
        time.sleep(1)
    assert again.status_code == 200
