"""Which KV bootstrap port a prefill engine serves on.

The ports are fixed before launch (`cluster.topology.bootstrap_ports`: one per replica a pool's
prefill role may have); replica rank r takes its pool's r-th port. SGLang binds the port only
when its tokenizer manager starts, seconds after the engine was configured, and merely logs a
failed bind while the prefill ranks register at that address, so a port must never be chosen by
probing whether something listens. Instead the replica claims its port with an exclusive lock
on a node-local file before the engine starts, held for the replica's life (the OS drops it with
the process). Serve may later move a live replica to another rank to keep ranks contiguous; a
new replica whose slot is still held by such an engine takes the next unclaimed slot of the same
range, and a range with none left refuses to start, naming it.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "small4-bootstrap-ports"


class PortClaim:
    """An exclusive claim on one bootstrap port of this node, until `release` or process exit."""

    def __init__(self, port: int, fd: int):
        self.port, self._fd = port, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def claim_port(ports: list[int], rank: int, lock_dir: Path = LOCK_DIR) -> PortClaim:
    """Claim `ports[rank]`, or the next unclaimed port of `ports` after it."""
    if not ports:
        raise ValueError("this prefill engine has no bootstrap ports: its pool's prefill role "
                         "holds no GPUs in the topology")
    lock_dir.mkdir(parents=True, exist_ok=True)
    start = rank % len(ports)
    for port in ports[start:] + ports[:start]:
        fd = os.open(lock_dir / f"{port}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return PortClaim(port, fd)
    raise RuntimeError(f"every KV bootstrap port {ports[0]}-{ports[-1]} of this pool is claimed "
                       "on this node: more prefill replicas here than the pool's max_replicas")


def replica_rank() -> int:
    """This Serve replica's rank within its deployment (0 outside Serve)."""
    try:
        from ray import serve

        return int(serve.get_replica_context().rank.rank)
    except Exception:  # not inside a Serve replica (tests, `small4 generate`)
        return 0
