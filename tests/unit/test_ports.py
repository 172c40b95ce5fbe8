"""The free port benches and tests hand to servers: outside the kernel's ephemeral range, so an
outgoing connection made before the server binds cannot take it."""

from __future__ import annotations

import socket

import pytest

from bench import ports


def test_a_free_port_lies_between_rays_worker_ports_and_the_ephemeral_range():
    start = ports.ephemeral_start()
    if start <= 20001:
        pytest.skip(f"the ephemeral range starts at {start}: no room below it")
    for _ in range(20):
        port = ports.free_port()
        assert 20000 <= port < start
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # it is free


def test_a_port_held_by_a_listener_is_never_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # a range of that one port: every draw is taken, so the kernel chooses
        monkeypatch.setattr(ports, "_LOW", port)
        monkeypatch.setattr(ports, "ephemeral_start", lambda: port + 1)
        for _ in range(5):
            other = ports.free_port(attempts=5)
            assert other != port
            with socket.socket() as s:
                s.bind(("127.0.0.1", other))
