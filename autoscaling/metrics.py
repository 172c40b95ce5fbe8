"""What the workers of one pool-and-role report to the autoscaler, and what a policy wishes back.

Plain frozen data, no Ray: the Serve adapter fills `RoleMetrics` from replica stats and
Prometheus windows, the simulator from its modelled engines. Rates and percentiles are over the
reporter's recent window (about ten seconds); counts are instantaneous.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, str]  # (pool, role): ("fast" | "deep", "prefill" | "decode")
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class RoleMetrics:
    """One pool-and-role's load and latency, summed (counts) or per replica (capacities)."""

    replicas: int  # ready and serving
    starting: int = 0  # assigned but still loading (cold start)
    queued_requests: int = 0  # waiting for this role (prefill queue, or decode slot)
    queued_prompt_tokens: int = 0
    arrival_requests_per_s: float = 0.0
    arrival_prompt_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # per busy replica, measured; 0 when unknown
    running_requests: int = 0
    max_running_per_replica: int = 0  # decode slots (the engine's max running requests)
    decode_residency_s: float = 0.0  # mean time a request spends decoding, measured
    generated_tokens_per_s: float = 0.0  # decode output, all replicas, measured
    mean_output_tokens: float = 0.0  # of requests that finished decoding, measured
    arriving_output_tokens: float = 0.0  # expected of a request arriving now; 0 when unknown
    decode_tokens_per_s_per_replica: float = 0.0  # at full batch, profiled; 0 when unknown
    kv_tokens_used: int = 0
    kv_capacity_per_replica: int = 0
    itl_p50_s: float | None = None
    itl_p90_s: float | None = None
    ttft_p90_s: float | None = None  # end to end, the pool's
    queue_wait_p90_s: float | None = None  # time spent in this role's queue


@dataclass(frozen=True)
class Wish:
    """What a policy asks for: a replica count, the work behind it, and how late it runs.

    `load` is the work in engines at full utilisation (fractional); `pressure` is the worst
    observed/SLO ratio (> 1 means the SLO is being missed), which breaks ties under
    contention; `peak` is the highest work arriving seen recently (decaying), which the arbiter
    counts as need and places spare engines by (`load` when not given).
    """

    replicas: int
    min_replicas: int = 1
    max_replicas: int = 8
    load: float = 0.0
    pressure: float = 0.0
    peak: float | None = None  # the recent peak load (engines), where the spares go
