"""Performance model of one Mistral Small 4 FP8 engine at TP2 on two H200s: the simulator's
engines, and the decode capacity production's policy reads where its profile asks
(`autoscaling.decode_capacity: perf_model`).

Prefill is compute-bound: 12.2 GFLOP per token for the matmuls plus attention that grows with
the prompt (14.6 GF/token at 8K, 21.9 at 32K, 50.8 at 128K: +0.293 GF per 1K tokens of
context), at the anchors' calibrated 0.5 PFLOP/s per GPU (~34k tok/s per GPU at 8K), times
`prefill_efficiency` (0.7 by default: TP2 all-reduces, scheduling and chunking), so about 48k
prompt tok/s per engine at 8K. A batch of prompts up to `max_batched_tokens` runs as one
forward with a fixed overhead.

Decode is bandwidth-bound: each step reads 2.47 GB always (attention, shared expert, router,
`lm_head`) plus 0.907 GB per distinct routed expert (25.2 MB per layer, 36 layers), with
128(1 - (1 - 4/128)^B) distinct experts at batch B, plus the KV of every running sequence
(11,520 B per token in FP8); over 2 x 4.8 TB/s at `decode_bandwidth_efficiency` (0.6 by
default), plus a 3 ms floor for launches and collectives. At batch 128 and 4K context that is
~24 ms per step, ~5.3k tok/s per engine (the anchors' ceiling is 9.6k). Batch is capped by the
engine's max running requests (128, the model card's recipe). KV capacity is the HBM left after
FP8 weights at the memory fraction: ~9.6M tokens per engine, so with MLA's small KV the slots,
not the KV, bound decode at these context lengths.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# the context a decode engine's capacity is taken at while it runs nothing
DEFAULT_CONTEXT = 4096.0


class PerfModel(BaseModel):
    """Costs and capacities of one TP2 engine, and the lifecycle of moving one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus_per_engine: int = Field(2, ge=1)
    pflops_per_gpu: float = Field(0.5, gt=0, description="calibrated sustained, anchors")
    prefill_efficiency: float = Field(0.7, gt=0, le=1)
    gflop_per_token: float = Field(12.2, gt=0)
    gflop_per_token_per_context_token: float = Field(2.93e-4, ge=0)
    prefill_batch_overhead_s: float = Field(0.02, ge=0)
    max_batched_tokens: int = Field(16384, gt=0)
    hbm_bytes_per_s_per_gpu: float = Field(4.8e12, gt=0)
    decode_bandwidth_efficiency: float = Field(0.6, gt=0, le=1)
    always_read_bytes: float = Field(2.47e9, ge=0)
    expert_bytes: float = Field(0.9072e9, ge=0, description="one expert, all layers")
    experts: int = Field(128, gt=0)
    experts_per_token: int = Field(4, gt=0)
    kv_bytes_per_token: float = Field(11_520.0, gt=0)
    step_floor_s: float = Field(0.003, ge=0)
    max_running: int = Field(128, gt=0)
    hbm_bytes_per_gpu: float = Field(141e9, gt=0)
    memory_fraction: float = Field(0.85, gt=0, le=1)
    weights_bytes_per_gpu: float = Field(60.5e9, ge=0)
    reserved_bytes_per_gpu: float = Field(4e9, ge=0)
    kv_transfer_s: float = Field(0.005, ge=0)
    cold_start_s: float = Field(90.0, ge=0, description="load weights, capture graphs")
    drain_timeout_s: float = Field(
        60.0, ge=0, description="a role's drain_deadline_s: then the replica goes; its decode "
        "streams are resumed on another replica of the pool (prompt and tokens sent "
        "prefilled again), its prefill batch is lost")

    @property
    def prefill_flops_per_s(self) -> float:
        """Sustained FLOP/s of one engine in prefill."""
        return self.gpus_per_engine * self.pflops_per_gpu * 1e15 * self.prefill_efficiency

    def prompt_flops(self, tokens: int) -> float:
        """FLOPs to prefill one prompt of `tokens` tokens."""
        per_token = self.gflop_per_token + self.gflop_per_token_per_context_token * tokens
        return tokens * per_token * 1e9

    def prefill_s(self, prompts: list[int]) -> float:
        """Seconds to prefill a batch of prompts in one pass."""
        flops = sum(self.prompt_flops(n) for n in prompts)
        return self.prefill_batch_overhead_s + flops / self.prefill_flops_per_s

    def prefill_cached_s(self, prompts: list[tuple[int, int]]) -> float:
        """Seconds to prefill a batch of (prompt, cached) token counts: the cached prefix's
        compute (its tokens and their attention) is not redone."""
        flops = sum(self.prompt_flops(n) - self.prompt_flops(min(c, n)) for n, c in prompts)
        return self.prefill_batch_overhead_s + flops / self.prefill_flops_per_s

    def decode_step_s(self, batch: int, context_tokens: float) -> float:
        """Seconds per decode step for `batch` sequences holding `context_tokens` in all."""
        if batch <= 0:
            return self.step_floor_s
        distinct = self.experts * (1 - (1 - self.experts_per_token / self.experts) ** batch)
        read = (self.always_read_bytes + self.expert_bytes * distinct
                + self.kv_bytes_per_token * context_tokens)
        bandwidth = self.gpus_per_engine * self.hbm_bytes_per_s_per_gpu
        return self.step_floor_s + read / (bandwidth * self.decode_bandwidth_efficiency)

    def decode_tokens_per_s(self, context_tokens: float | None) -> float:
        """Tokens/s of one engine decoding a full batch (`max_running`) whose sequences hold
        `context_tokens` each (`DEFAULT_CONTEXT` when none is running to say)."""
        n = self.max_running
        context = DEFAULT_CONTEXT if context_tokens is None else context_tokens
        return n / self.decode_step_s(n, n * context)

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens one engine holds: HBM at the memory fraction, less weights and reserve."""
        free = (self.hbm_bytes_per_gpu * self.memory_fraction - self.weights_bytes_per_gpu
                - self.reserved_bytes_per_gpu)
        return int(self.gpus_per_engine * max(free, 0.0) / self.kv_bytes_per_token)
