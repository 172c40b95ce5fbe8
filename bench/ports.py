"""A free loopback port for a server a bench or test starts, chosen where nothing else picks one.

Asking the kernel (bind to port 0) returns a port from its ephemeral range and puts it back in
that pool when the probe closes: every outgoing connection made before the server binds it — Ray
starting makes hundreds, on loopback — can take it, and the server then fails to bind (a CI run's
Serve proxy did). A port below the ephemeral range and above Ray's worker ports is only ever
taken by a process that names it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's default worker ports are 10002-19999; the ephemeral range starts at 32768 on Linux.
_LOW = 20000
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port on `host` that binds now, drawn from between Ray's worker ports and the ephemeral
    range; the kernel's choice only where that range is empty or every draw is taken."""
    high = ephemeral_start()
    draw = random.SystemRandom()
    for _ in range(attempts if high > _LOW else 0):
        port = draw.randrange(_LOW, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
