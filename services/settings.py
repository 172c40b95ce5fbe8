"""Typed settings of the request path; the root that composes them lives in `cluster.settings`.

Every model forbids unknown keys, so a typo in a profile fails at load time naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Effort = Literal["none", "high"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Strict):
    """Which weights and tokenizer to serve, and under which name."""

    name: str = "mistral-small-4"
    source: Literal["standin", "checkpoint"] = "standin"
    seed: int = Field(0, description="the stand-in's weights; on SGLang, its random_seed only "
                      "where set (else drawn per launch)")
    path: Path | None = Field(None, description="local HF checkpoint directory (source=checkpoint)")
    tokenizer: Path | None = Field(None, description="tekken.json; default: the stand-in's")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the CPU engines'; SGLang's only where set (else `auto`, the "
        "checkpoint's)")
    context_length: int = Field(32768, gt=0)

    @model_validator(mode="after")
    def _path_for_checkpoint(self):
        if self.source == "checkpoint" and self.path is None:
            raise ValueError("model.path is required when model.source is 'checkpoint'")
        return self

    def tokenizer_file(self) -> Path | None:
        """The `tekken.json` prompts are encoded with, read at start-up (None: the stand-in's).

        A checkpoint's own `tekken.json` wins: encoding a real model's prompts with the
        stand-in's relabelled vocabulary would feed it other ids. A `model.tokenizer` given
        beside a checkpoint that carries its own must be the same file, or start-up stops; so
        does a checkpoint directory that is not there (a node without the model's mount: its
        ingress and image service would encode with the stand-in's vocabulary).
        """
        if self.source == "checkpoint" and self.path and self.tokenizer is None \
                and not self.path.is_dir():
            raise ValueError(f"model.path {self.path}: no such directory on this node (the "
                             "model's volume not mounted?)")
        own = self.path / "tekken.json" if self.source == "checkpoint" and self.path else None
        if own is None or not own.is_file():
            return self.tokenizer
        if self.tokenizer is not None and Path(self.tokenizer).read_bytes() != own.read_bytes():
            raise ValueError(f"model.tokenizer {self.tokenizer} differs from the checkpoint's own "
                             f"{own}: prompts would be encoded with another vocabulary")
        return own


class SimulatedTiming(Strict):
    """Timing model of the simulated engine (milliseconds)."""

    prefill_ms_per_token: float = Field(0.0, ge=0)
    prefill_base_ms: float = Field(0.0, ge=0)
    decode_step_ms: float = Field(0.0, ge=0)
    decode_ms_per_seq: float = Field(0.0, ge=0)
    output: Literal["echo", "counter"] = "echo"


class FaultSettings(Strict):
    """Faults the simulated engine injects, for fault tests: every Nth prefill fails, and every
    Nth decode stream fails after some tokens, as a crashed engine would (retryable)."""

    prefill_fail_every: int = Field(0, ge=0, description="0: never")
    decode_fail_every: int = Field(0, ge=0, description="0: never")
    decode_fail_after_tokens: int = Field(8, ge=0)


class SGLangSettings(Strict):
    """What the SGLang engines (GPU hosts) are started with, beyond the model and topology."""

    load_format: Literal["auto", "mistral", "dummy"] = Field(
        "auto", description="dummy: random weights of the checkpoint's shape (smoke tests)")
    transfer_backend: Literal["nixl", "mooncake"] = Field(
        "nixl", description="KV transfer between engines (Mooncake failed at ~4 rps, #23272)")
    mem_fraction_static: float = Field(0.85, gt=0, lt=1)
    chunked_prefill_size: int = Field(16384, gt=0)
    attention_backend: str | None = Field(None, description="None: SGLang's choice")
    deterministic: bool = Field(
        False, description="honour per-request seeds (SGLang's deterministic inference, pytorch "
                           "sampling); off, a seed on a sampled request is refused (400)")
    server_args: dict[str, Any] = Field(
        default_factory=dict, description="further sglang ServerArgs fields, passed as given")


class SpeculativeSettings(Strict):
    """Speculative decoding on the SGLang engines (EAGLE with Mistral's companion draft model).

    Both roles get it in PD mode: the decode engine drafts and verifies, and the prefill engine
    runs the draft model over the prompt too, sending its hidden states with the KV."""

    algorithm: Literal["EAGLE", "EAGLE3"] = "EAGLE"
    draft_model_path: Path = Field(description="local directory of the draft checkpoint")
    num_steps: int = Field(3, ge=1, description="draft steps per verification")
    eagle_topk: int = Field(1, ge=1, description="branches kept per draft step")
    num_draft_tokens: int = Field(4, ge=2, description="tokens verified per step")

    @model_validator(mode="after")
    def _draft_tokens_fit(self):
        if self.eagle_topk == 1 and self.num_draft_tokens > self.num_steps + 1:
            raise ValueError(f"num_draft_tokens {self.num_draft_tokens} exceeds num_steps + 1 "
                             f"({self.num_steps + 1}), all a chain of eagle_topk 1 can draft")
        return self


class PrefixCacheSettings(Strict):
    """Reuse of prompt KV across requests (CPU engines; SGLang's radix cache does it there,
    turned off with `enabled`; its block and capacity are the CPU engines' only)."""

    enabled: bool = True
    block_tokens: int = Field(64, gt=0, description="tokens per cached block: a prompt reuses "
                              "whole blocks only (CPU engines)")
    capacity_tokens: int | None = Field(None, ge=0, description="tokens of prompt KV kept "
                                        "(least recently used evicted first); None: the "
                                        "engine's kv_capacity_tokens")


class EngineSettings(Strict):
    """The engine behind every worker of the stack and its capacity."""

    kind: Literal["reference", "simulated", "sglang"] = "reference"
    prefill_chunk_tokens: int = Field(512, gt=0, description="the reference engine's prefill "
                                      "chunk (SGLang's: engine.sglang.chunked_prefill_size)")
    max_running_requests: int = Field(64, gt=0)
    kv_capacity_tokens: int = Field(262144, gt=0)
    torch_threads: int = Field(1, gt=0, description="the reference engine's torch threads")
    prefix_cache: PrefixCacheSettings = PrefixCacheSettings()
    simulated: SimulatedTiming = SimulatedTiming()
    sglang: SGLangSettings = SGLangSettings()
    speculative: SpeculativeSettings | None = Field(
        None, description="SGLang only: speculative decoding with a draft model")
    faults: FaultSettings = FaultSettings()

    @model_validator(mode="after")
    def _speculation_needs_sglang(self):
        if self.speculative is not None and self.kind != "sglang":
            raise ValueError("engine.speculative needs engine.kind sglang")
        return self


class KVHandoffSettings(Strict):
    """How prefill hands the KV cache to decode."""

    backend: Literal["object_store", "local", "paired", "sglang"] = "object_store"
    timeout_s: float = Field(
        30.0, gt=0, description="object_store, local, paired: how long a prefilled KV is "
        "held for decode to take it. Unused by sglang, whose bootstrap and waiting timeouts "
        "follow the attempt's deadline (prefill_timeout_s and the context length)")
    inline_bytes: int = Field(
        1 << 20, ge=0, description="object_store: a KV up to this size rides in the prefill "
        "reply itself (Ray inlines small results the same way); larger ones go through the "
        "object store by reference (one copy, into the decode replica's engine)")
    prefill_timeout_s: float = Field(60.0, gt=0, description="per attempt, queueing included")
    prefill_attempts: int = Field(3, ge=1, description="on another replica after a failure")
    prefill_tokens_per_s_floor: float = Field(
        2000.0, gt=0, description="the slowest prefill a healthy engine keeps up; each prompt "
        "token adds 1/floor seconds to its attempt's deadline")
    ingress_prefill: bool = Field(
        True, description="sequential handoffs (object_store, local): the ingress runs a "
        "request's prefill itself and sends its first token at once, while decode receives "
        "the KV, so the first token skips the decode hop; off: decode runs the prefill")

    def attempt_timeout_s(self, prompt_tokens: int) -> float:
        """How long one prefill attempt of a `prompt_tokens` prompt may take, queueing included:
        a long prompt gets the time its length needs on top of `prefill_timeout_s`."""
        return self.prefill_timeout_s + prompt_tokens / self.prefill_tokens_per_s_floor


class DeploymentSettings(Strict):
    """A Serve deployment's size: replicas, resources per replica, concurrency per replica,
    and how long a replica that is going away (scale-down, shutdown) may take to finish its
    in-flight requests after it stops taking new ones."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, gt=0)
    drain_deadline_s: float = Field(60.0, gt=0)


class RoleSettings(DeploymentSettings):
    """One role (prefill or decode) of one pool: its replicas and resources.

    `replicas` is the count at start; with `autoscaling.enabled` the policy moves it between
    `min_replicas` and `max_replicas` (both default to `replicas`: a fixed role). A replica
    that is scaled down or shut down stops taking requests and leaves when its in-flight
    requests finish or `drain_deadline_s` passes.
    """

    replicas: int = Field(1, ge=1, description="at start (a role without one serves nothing: "
                          "its pool's requests would wait out their deadlines)")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(
        None, gt=0, description="Serve's cap on one replica's calls in flight; default: "
        "prefill 64, decode twice the engine's max_running_requests, at least 64 (a stream "
        "holds its call for its whole life: a cap below the engine's batch slots leaves them "
        "empty, and the streams above it wait in Serve's router, where the autoscaler does "
        "not see them; in the engine's queue it does)")

    @model_validator(mode="after")
    def _bounds_hold_replicas(self):
        if not self.lowest <= self.replicas <= self.highest:
            raise ValueError(f"replicas {self.replicas} is outside min_replicas {self.lowest} "
                             f"and max_replicas {self.highest}")
        return self

    @property
    def lowest(self) -> int:
        return self.replicas if self.min_replicas is None else self.min_replicas

    @property
    def highest(self) -> int:
        return self.replicas if self.max_replicas is None else self.max_replicas

    @property
    def scalable(self) -> bool:
        return self.highest > self.lowest


class SLOSettings(Strict):
    """A pool's latency objectives: time to first token, and time per output token after it."""

    ttft_s: float = Field(2.0, gt=0)
    itl_s: float = Field(0.1, gt=0)


class PoolSettings(Strict):
    """A replica pool serving one reasoning effort."""

    effort: Effort
    prefill: RoleSettings = RoleSettings()
    decode: RoleSettings = RoleSettings()
    max_queue: int = Field(32, gt=0, description="in-flight decode streams (a request's n "
                           "choices are n) before spillover; when every pool that could take "
                           "a request is full, it gets 503 (an idle pool takes any n)")
    priority: int = Field(0, description="who keeps engines when the GPU budget is short")
    slo: SLOSettings = SLOSettings()


class PrefixRoutingSettings(Strict):
    """Which prefill replica a prompt goes to, where a pool's prefill role may have several:
    `cache_aware` (ours: where its prefix is cached, against queued prefill tokens; see
    services/workers/prefix_router.py), `serve_default` (Serve's power of two choices), or
    `ray_prefix_affinity` (Ray's PrefixCacheAffinityRouter, a baseline for the bench)."""

    router: Literal["cache_aware", "serve_default", "ray_prefix_affinity"] = "cache_aware"
    max_imbalance: float = Field(1.5, ge=1.0, description="no replica is chosen while its "
                                 "queued prefill tokens exceed this × the shortest queue + "
                                 "one prompt, or its calls in flight this × the fewest + 4")
    load_blocks: float = Field(3.0, ge=0, description="cache_aware: each request routed to a "
                               "replica lately counts as this many blocks of load there, so "
                               "equal scores spread instead of piling on one replica")
    load_half_life_s: float = Field(30.0, gt=0, description="cache_aware: how fast that "
                                    "recent load fades (it halves every this many seconds)")
    recompute_weight: float = Field(
        1.0, ge=1.0, description="cache_aware: each prompt token a replica would compute "
        "counts as this many queued tokens (above 1: recomputing a prefix that is cached "
        "elsewhere costs every later request too, not only this one's wait)")
    share_interval_s: float = Field(
        0.1, ge=0, description="cache_aware: how often the routers of a prefill deployment "
        "(one in every ingress and decode replica) send each other where they routed prompts; "
        "0 keeps each to its own decisions")
    shared_tenants: dict[str, list[str]] = Field(
        {}, description="groups of tenants whose prompts may share cached KV (a hit is visibly "
        "faster, so a shared cache tells one tenant what another sent); every other tenant's "
        "cache is its own")

    @model_validator(mode="after")
    def _one_group_per_tenant(self):
        seen: dict[str, str] = {}
        for group, tenants in self.shared_tenants.items():
            for tenant in tenants:
                if seen.setdefault(tenant, group) != group:
                    raise ValueError(f"routing.prefix.shared_tenants: tenant {tenant!r} is in "
                                     f"both {seen[tenant]!r} and {group!r}")
        return self


class RoutingSettings(Strict):
    """How a request's `reasoning_effort` picks a pool, and a prompt its prefill replica."""

    # OpenAI's efforts (its SDK's `ReasoningEffort`) onto the model's two: above medium, the
    # most this model reasons is `high`
    effort_map: dict[str, Effort] = {"none": "none", "minimal": "none", "low": "none",
                                     "medium": "high", "high": "high", "xhigh": "high",
                                     "max": "high"}
    default_effort: str = "none"
    spillover: bool = True
    prefix: PrefixRoutingSettings = PrefixRoutingSettings()

    @model_validator(mode="after")
    def _default_known(self):
        if self.default_effort not in self.effort_map:
            raise ValueError(f"routing.default_effort {self.default_effort!r} is not in effort_map")
        return self


class StreamSettings(Strict):
    """Coalescing of tokens from decode to the ingress: flush at N tokens or after T ms."""

    interval_tokens: int = Field(16, gt=0)
    interval_ms: float = Field(20.0, ge=0)


class LimitSettings(Strict):
    """Per-request limits enforced at the ingress; size and nesting are checked before the
    body is parsed."""

    max_tokens_default: int = Field(1024, gt=0, description="where a request names none "
                                    "(at most max_tokens_cap)")
    max_tokens_cap: int = Field(32768, gt=0)
    # With reasoning on and the answer constrained (response_format, a forced tool call), the
    # reasoning may use this share of max_tokens; the rest is left for the constrained answer.
    constrained_reasoning_share: float = Field(0.5, gt=0.0, lt=1.0)
    max_messages: int = Field(512, gt=0)
    max_n: int = Field(4, ge=1, le=128, description="choices a request may ask for (n); each "
                       "is its own decode stream and counts its max_tokens against the quota")
    max_body_bytes: int = Field(112 * 1024 * 1024, gt=0, description="8 images of 10 MB, "
                                "base64 (4/3 of their bytes: 107 MB), and the text")
    max_string_bytes: int = Field(16 * 1024 * 1024, gt=0, description="one JSON string")
    max_json_depth: int = Field(32, gt=0)
    max_schema_bytes: int = Field(256 * 1024, gt=0, description="JSON of what a structured "
                                  "answer's grammar is compiled from (response_format's schema, "
                                  "or the tools when a call is constrained)")
    max_concurrent_compiles: int = Field(2, gt=0, description="grammars compiled at once per "
                                         "ingress replica (CPU-bound; others wait their turn)")
    max_json_values: int = Field(100_000, gt=0, description="arrays, objects, strings and "
                                 "members in one body (an agent session of 250 tool calls "
                                 "with 128 tools has ~20k)")
    request_timeout_s: float = Field(600.0, gt=0, description="default deadline")
    max_request_timeout_s: float = Field(3600.0, gt=0, description="cap on x-request-timeout")
    max_resumes: int = Field(2, ge=0, description="decode restarts after a replica dies")
    body_idle_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next "
                                       "body bytes before 408")
    body_timeout_s: float = Field(120.0, gt=0, description="whole-body upload deadline (408)")
    body_check_budget_s: float = Field(5.0, gt=0, description="CPU time the body's size and "
                                       "depth check may take (400 beyond)")
    max_uploads: int = Field(128, gt=0, description="bodies being received at once per "
                             "ingress replica")
    max_uploads_per_key: int = Field(64, gt=0, description="bodies one key may be sending at "
                                     "once per ingress replica (half of max_uploads: one "
                                     "service's burst on a busy replica is not refused)")
    write_stall_s: float = Field(30.0, gt=0, description="longest a streamed answer waits for "
                                 "the client to take its next event (a reader that stopped "
                                 "reading), never past the request's deadline")
    upload_wait_s: float = Field(1.0, ge=0, description="wait for a free upload slot before 429")
    edge_body_budget_bytes: int = Field(1024 ** 3, gt=0, description="request body bytes each "
                                        "HTTP proxy may queue for ingress replicas that have "
                                        "not taken them yet (Serve's proxy reads a body whole "
                                        "while the request waits for a replica); a body that "
                                        "would pass it is refused at the edge (503)")

    @model_validator(mode="after")
    def _one_body_fits_the_edge(self):
        if self.edge_body_budget_bytes < self.max_body_bytes:
            raise ValueError(f"limits.edge_body_budget_bytes ({self.edge_body_budget_bytes}) "
                             f"is below limits.max_body_bytes ({self.max_body_bytes}): a "
                             "largest body would always be refused")
        return self

    @property
    def default_max_tokens(self) -> int:
        """A request's max_tokens when it names none: never more than one may ask for."""
        return min(self.max_tokens_default, self.max_tokens_cap)


class QuotaSettings(Strict):
    """A key's quota; None is unlimited."""

    requests_per_s: float | None = Field(None, gt=0)
    tokens_per_min: float | None = Field(None, gt=0, description="prompt + max_tokens")
    max_concurrent_streams: int | None = Field(None, gt=0, description="decode streams in "
                                               "flight: a request of n choices holds n")


class AuthSettings(Strict):
    """API keys. On unless turned off explicitly; the keys file may be a mounted Secret."""

    enabled: bool = True
    keys_file: Path | None = None
    reload_s: float = Field(5.0, gt=0)
    default_quota: QuotaSettings = QuotaSettings()
    # browser origins (e.g. "https://app.example.com") allowed to call the API; empty: CORS off,
    # no CORS headers and no preflight answered
    cors_origins: list[str] = []

    @model_validator(mode="after")
    def _keys_when_enabled(self):
        if self.enabled and self.keys_file is None:
            raise ValueError("auth.keys_file is required when auth is enabled (set "
                             "auth.enabled: false to serve without keys)")
        return self


class IngressDeploymentSettings(DeploymentSettings):
    """The HTTP ingress deployment."""

    max_ongoing_requests: int = Field(256, gt=0)
    max_queued_requests: int | None = Field(
        None, gt=0, description="requests waiting for a replica's slot beyond "
        "max_ongoing_requests (in Serve's proxy, or in the replica itself where it serves HTTP "
        "directly, each holding its body, read before it waits, before its key is checked); "
        "more are refused at once with a 503 and Retry-After. None: no bound (Serve's "
        "default). Where the replica serves HTTP itself, Serve counts every request that has "
        "not yet taken a slot, a burst's arrivals included (200 at once on 512 free slots had "
        "117 refused at 64): size it above the largest burst")


class ImageSettings(Strict):
    """What image inputs are accepted, and from where."""

    max_images: int = Field(8, ge=0, description="images per request")
    max_bytes: int = Field(10 * 1024 * 1024, gt=0, description="encoded bytes per image")
    max_pixels: int = Field(40_000_000, gt=0, description="decoded width x height per image")
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")
    max_request_pixels: int = Field(48_000_000, gt=0, description="decoded width x height "
                                    "summed over a request's images, checked before decoding")
    max_pixels_per_token: int = Field(100_000, gt=0, description="decoded pixels per prompt "
                                      "token the image is encoded as: decoding costs its "
                                      "pixels, the key is charged its tokens (a 1 x 40M PNG "
                                      "of 78 KB took 3.5 s and 2 GB to decode for 110 "
                                      "tokens; a 40 MP photo has 13k per token)")
    max_jpeg_scans: int = Field(32, gt=0, description="start-of-scan markers per JPEG (each "
                                "progressive scan costs a pass over the whole image)")
    decode_threads: int = Field(2, gt=0, description="images decoded at once per replica; "
                                "further requests wait their turn within their deadline")
    decode_niceness: int = Field(10, ge=0, le=19, description="how far below the node's other "
                                 "work decode threads run when cores are short (Linux niceness "
                                 "added per thread; 0: same priority)")
    allow_urls: bool = Field(False, description="fetch http(s) image URLs (data: URLs always)")
    url_allowlist: tuple[str, ...] = Field((), description="hosts; '.example.com' = subdomains")
    url_timeout_s: float = Field(5.0, gt=0, description="whole fetch, redirects included")
    max_redirects: int = Field(3, ge=0)
    admit_loopback_for_tests: bool = Field(False, description="tests only: also fetch from "
                                           "loopback addresses (a local test server); never on "
                                           "in a profile")

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        """Pillow's names (upper case): `png` matched no image's format (every image was
        refused as the client's fault), and a name Pillow lacks failed every image (a 400)."""
        from PIL import Image

        Image.init()
        known = {name.upper(): name for name in Image.OPEN}
        names = {"JPG": "JPEG"}  # the common alias, as Pillow itself does not take it
        out = []
        for name in formats:
            upper = names.get(name.strip().upper(), name.strip().upper())
            if upper not in known:
                raise ValueError(f"image format {name!r} is not one Pillow reads (one of "
                                 f"{', '.join(sorted(known))})")
            out.append(known[upper])
        return tuple(dict.fromkeys(out))


class MultimodalSettings(DeploymentSettings):
    """The image preprocessing deployment (CPU): its size and the image policy."""

    max_ongoing_requests: int = Field(16, gt=0)
    images: ImageSettings = ImageSettings()
    max_held_bytes: int = Field(
        4 * 1024 ** 3, gt=0, description="pixel tensors a replica keeps in Ray's object store "
        "for the requests in flight (each until its request ends); a request whose images "
        "would go beyond is answered 503 with Retry-After")


class TracingSettings(Strict):
    """OpenTelemetry tracing. A field left unset follows OpenTelemetry's `OTEL_*` environment
    variables as the specification defines them; a field set here wins over the environment."""

    enabled: bool | None = Field(
        None, description="None: on when the environment names an OTLP endpoint "
        "(OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT) or an exporter (OTEL_TRACES_EXPORTER other than "
        "none); OTEL_SDK_DISABLED=true turns tracing off whatever this says")
    exporter: Literal["otlp_http", "otlp_grpc", "console", "none"] | None = Field(
        None, description="None: OTEL_TRACES_EXPORTER with OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, "
        "else otlp_http")
    endpoint: str | None = Field(None, description="None: the SDK's OTEL_EXPORTER_OTLP_* variables")
    headers: dict[str, str] = {}
    sampling_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="parent-based ratio sampler; None: "
        "OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG, else parent-based always-on")
    service_name: str | None = Field(None, description="default: OTEL_SERVICE_NAME, else small4")
    resource_attributes: dict[str, str] = {}
    export_interval_ms: int = Field(5000, gt=0, description="batch export delay (SDK default)")


class TelemetrySettings(Strict):
    """Traces and logs of every deployment."""

    tracing: TracingSettings = TracingSettings()
    json_logs: bool = True
    tenant_labels: bool = Field(False, description="label request and token counters by tenant "
                                "(anyone who can scrape the metrics then reads each tenant's "
                                "traffic); off: the tenant label reads `all`")


class MultimodalWorkerSettings(Strict):
    """The tokenizer to encode with, the image policy, telemetry."""

    model: ModelSettings
    images: ImageSettings
    telemetry: TelemetrySettings = TelemetrySettings()
    # The engine's vision tower takes one image size per request (SGLang): pad to one here,
    # where the prompt is encoded, so every later step sees the same ids.
    one_image_size: bool = False
    max_held_bytes: int = 4 * 1024 ** 3
    drain_deadline_s: float = 60.0  # its deployment's graceful_shutdown_timeout_s


class WorkerSettings(Strict):
    """One pool's prefill or decode worker: which model and engine it runs, how KV and tokens
    leave it."""

    pool: str
    model: ModelSettings
    engine: EngineSettings
    kv_handoff: KVHandoffSettings
    stream: StreamSettings
    telemetry: TelemetrySettings = TelemetrySettings()
    slo: SLOSettings = SLOSettings()
    # GPU engines: GPUs per engine, and the KV bootstrap ports a prefill engine may take
    tensor_parallel: int = 1
    bootstrap_ports: list[int] = []


# `data:image/<type>;base64,`, with room for a long media type
DATA_URL_HEADER_BYTES = 64


class ServiceSettings(Strict):
    """Everything a request-path deployment needs; each deployment reads only its own part."""

    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    kv_handoff: KVHandoffSettings = KVHandoffSettings()
    pools: dict[str, PoolSettings] = {"fast": PoolSettings(effort="none"),
                                      "deep": PoolSettings(effort="high")}
    routing: RoutingSettings = RoutingSettings()
    stream: StreamSettings = StreamSettings()
    limits: LimitSettings = LimitSettings()
    ingress: IngressDeploymentSettings = IngressDeploymentSettings()
    multimodal: MultimodalSettings = MultimodalSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    auth: AuthSettings = Field(description="required: a keys file, or `enabled: false`")

    @model_validator(mode="after")
    def _every_effort_has_a_pool(self):
        served = {p.effort for p in self.pools.values()}
        missing = sorted(set(self.routing.effort_map.values()) - served)
        if missing:
            raise ValueError(f"no pool serves effort {missing}; add a pool with that effort")
        return self

    @model_validator(mode="after")
    def _an_image_fits_in_a_string(self):
        """An image of `multimodal.images.max_bytes` sent as a `data:` URL (base64, a third
        longer, behind its header) must be a JSON string `limits.max_string_bytes` allows: the
        body check runs first, so images between the two were refused as an over-long string,
        never reaching the image limit the profile set."""
        image = self.multimodal.images.max_bytes
        url = DATA_URL_HEADER_BYTES + 4 * -(-image // 3)
        if url > self.limits.max_string_bytes:
            raise ValueError(
                f"multimodal.images.max_bytes: an image of {image} bytes is a data: URL of "
                f"about {url} bytes, over limits.max_string_bytes ({self.limits.max_string_bytes}"
                f"): give limits.max_string_bytes at least {url}, or a smaller image limit")
        return self


class IngressSettings(Strict):
    """What the ingress needs: the served model, routing, the pools' limits, request limits."""

    model: ModelSettings
    engine_kind: str
    routing: RoutingSettings
    pools: dict[str, PoolSettings]
    limits: LimitSettings
    auth: AuthSettings
    telemetry: TelemetrySettings = TelemetrySettings()
    kv_handoff: KVHandoffSettings = KVHandoffSettings()
    # images per request and bytes per data-URL image (the multimodal deployment's limits),
    # checked before any is sent there
    max_images: int = Field(8, ge=0)
    max_image_bytes: int = Field(10 * 1024 * 1024, gt=0)
