"""Translation between our engine seam and SGLang 0.5.23's `sglang.Engine`, with no sglang
import, so it is tested on any machine (against SGLang's real classes where they import, and
against the signatures recorded in `tests/contract/sglang_0.5.23.json` elsewhere).

- `server_args`: the `ServerArgs` of one prefill or decode engine. The engine never sees text:
  `skip_tokenizer_init` makes it take and return token ids, so mistral-common's control tokens
  (`[THINK]`, `[TOOL_CALLS]`, images) survive and our parsers read the output.
- `generate_args`: one `async_generate` call: ids, sampling (`max_new_tokens` always set; stop
  strings are ours, since an engine without a tokenizer cannot match text; a grammar as `ebnf`,
  see `grammar_key`), `rid` = our request id (needed to abort), the trace header, the PD
  bootstrap fields, preprocessed images.
- `image_payload`: a request's images as the one `processor_output` item SGLang takes.
- `engine_env`: the environment the engine's processes start with.
- `OutputReader`: SGLang's output dicts to our token chunks and errors.
"""

from __future__ import annotations

import hashlib

import math
import os
from typing import Any
from urllib.parse import quote

from services.engines.protocol import EngineRequest, FinishReason, TokenLogprob
from services.errors import EngineError, EngineUnavailable, InvalidRequest
from services.multimodal.uniform import ImageTokens, image_offsets, image_rows
from services.settings import (EngineSettings, KVHandoffSettings, ModelSettings,
                               SpeculativeSettings)
from services.telemetry.tracing import Tracing

SGLANG_VERSION = "0.5.23"
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
# The host SGLang's own health check and warm-up send PD requests to: a request naming it skips
# the KV transfer, so one engine can be probed without a peer.
FAKE_BOOTSTRAP_HOST = "2.2.2.2"
# What the Mistral-native config remap assumes when params.json names no `max_seq_len`.
SGLANG_NATIVE_CONTEXT_DEFAULT = 128_000
# Python packages of each KV transfer backend, and the extra that installs them.
TRANSFER_PACKAGES = {"nixl": ("nixl._api", "sglang"), "mooncake": ("mooncake.engine", "mooncake")}
# SGLang's grammar backend our plugin completes with the Mistral token table (`sglang_grammar`).
GRAMMAR_BACKEND = "llguidance"
# The first line of a resumed leg's grammar: the tokens generated before it, to advance over.
ADVANCE_MARKER = "// small4-advance:"
# Beyond our own deadline, how long SGLang's PD clocks wait before they give up on a pairing.
PD_TIMEOUT_MARGIN_S = 10.0


def server_args(model: ModelSettings, engine: EngineSettings, *, role: str, tp_size: int,
                host: str, bootstrap_port: int | None,
                otlp_endpoint: str | None = None) -> dict[str, Any]:
    """`ServerArgs` keyword arguments of a `role` ("prefill" or "decode") engine: every model
    and engine setting SGLang has a field for (those it has none for, the CPU engines' own,
    say so in their descriptions)."""
    sglang = engine.sglang
    if role not in ("prefill", "decode"):
        raise ValueError(f"an SGLang engine is a prefill or a decode engine, not {role!r}")
    if model.path is None:
        raise ValueError("model.path is required for SGLang (a Mistral-native checkpoint whose "
                         "directory name contains 'mistral-small-4')")
    args: dict[str, Any] = {
        "model_path": str(model.path),
        "load_format": sglang.load_format,
        "skip_tokenizer_init": True,
        "context_length": model.context_length,
        "tp_size": tp_size,
        "mem_fraction_static": sglang.mem_fraction_static,
        "max_running_requests": engine.max_running_requests,
        # where a profile names them: the defaults are the CPU stand-in's (float32 weights,
        # seed 0), where SGLang's own (`auto`, the checkpoint's dtype; a seed drawn per
        # launch, so replicas do not sample alike) fit an engine better
        **({"dtype": model.dtype} if "dtype" in model.model_fields_set else {}),
        **({"random_seed": model.seed} if "seed" in model.model_fields_set else {}),
        "chunked_prefill_size": sglang.chunked_prefill_size,
        "disaggregation_mode": role,
        "disaggregation_transfer_backend": sglang.transfer_backend,
        # the bootstrap server binds here: the node's routable address, never 127.0.0.1
        "host": host,
        # structured outputs: SGLang's llguidance backend on the Mistral token table
        "grammar_backend": GRAMMAR_BACKEND,
        # a request's time in the scheduler's queue (`meta_info.queue_time`) is reported only
        # with SGLang's metrics on; without it a prefill's wait read as compute, and the
        # autoscaler saw busy engines and no queue
        "enable_metrics": True,
    }
    if role == "prefill":
        if bootstrap_port is None:
            raise ValueError("a prefill engine needs a KV bootstrap port")
        args["disaggregation_bootstrap_port"] = bootstrap_port
    if sglang.attention_backend:
        args["attention_backend"] = sglang.attention_backend
    if sglang.deterministic:
        args["enable_deterministic_inference"] = True
    if not engine.prefix_cache.enabled:  # its radix cache is SGLang's prefix cache
        args["disable_radix_cache"] = True
    if otlp_endpoint:
        args |= {"enable_trace": True, "otlp_traces_endpoint": otlp_endpoint}
    if engine.speculative is not None:
        args |= speculative_args(engine.speculative)
    clash = sorted(set(sglang.server_args) & set(args))
    if clash:
        raise ValueError(f"engine.sglang.server_args may not set {', '.join(clash)}: the stack "
                         "sets them from its own settings")
    return args | sglang.server_args


def speculative_args(spec: SpeculativeSettings) -> dict[str, Any]:
    """`ServerArgs` of speculative decoding; the same on both roles (see `SpeculativeSettings`)."""
    return {"speculative_algorithm": spec.algorithm,
            "speculative_draft_model_path": str(spec.draft_model_path),
            "speculative_num_steps": spec.num_steps,
            "speculative_eagle_topk": spec.eagle_topk,
            "speculative_num_draft_tokens": spec.num_draft_tokens}


def engine_env(model: ModelSettings, kv_handoff: KVHandoffSettings,
               tracing: Tracing | None) -> dict[str, str]:
    """Environment for the engine's processes.

    - PD timeouts: SGLang's clocks start before the prefill runs (decode's at `send_metadata`,
      prefill's bootstrap clock when its sender is made), so a long prompt behind a busy queue
      legitimately waits. Ours end each attempt (`KVHandoffSettings.attempt_timeout_s`, by prompt
      length) and abort it by rid; the engine's own clocks are set past the longest attempt any
      prompt the context admits can get, so the engine never gives up first.
    - Context: the model card serves 262144 tokens (YaRN factor 128 over 8192 positions:
      1048576 positional capacity), but SGLang's Mistral-native config remap inserts
      `max_seq_len = 128000` when params.json has none and reads it before anything else, then
      refuses a longer `context_length`. The override SGLang provides for this is set exactly
      when the served context is longer than that assumed default.
    - Traces (`tracing`: as `tracing.resolve` made it for this process, None when off):
      SGLang's exporter speaks gRPC unless told otherwise; it gets our protocol. Its
      `TracerProvider` takes the SDK's sampler from the environment (parent-based, always on,
      by default): a request's spans follow the decision in the trace header the workers pass,
      and the engine's own roots (its health probes) are sampled at our ratio, not all kept.
      Its exporter takes no headers and its resource names only its service: the collector's
      headers and our resource attributes reach the SDK through its environment variables, as
      does the export delay (its spans keep SGLang's own service name, `sglang`).
    - Tenants: SGLang caches vision-tower embeddings by the image's content hash alone, across
      tenants (the radix cache's `cache_salt` does not reach it): a tenant resending another's
      image would skip the tower, a difference in time that tells it the image was sent. The
      cache is off (`SGLANG_VLM_CACHE_SIZE_MB=0`). The cost: a tower run per request (the
      radix cache still keeps the KV), and per prefill chunk that reaches any image row: the
      images of a request of rows taller than one patch go as one item (SGLang splits an item
      per image only where each has one offset), so such a chunk runs the tower over all
      of them.
    """
    wait = math.ceil(kv_handoff.attempt_timeout_s(model.context_length) + PD_TIMEOUT_MARGIN_S)
    env = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": str(wait),
           "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": str(wait),
           "SGLANG_VLM_CACHE_SIZE_MB": "0"}
    if model.context_length > SGLANG_NATIVE_CONTEXT_DEFAULT:
        env["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"
    if tracing is not None and tracing.exporter in ("otlp_http", "otlp_grpc"):
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = ("grpc" if tracing.exporter == "otlp_grpc"
                                                     else "http/protobuf")
        if tracing.sampling_ratio is not None:
            env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                    "OTEL_TRACES_SAMPLER_ARG": repr(float(tracing.sampling_ratio))}
        # its exporters take no headers and its resource only a service name of its own: the
        # SDK reads the rest from the environment (a collector's auth, our resource attributes)
        if tracing.headers:
            env["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] = _otel_pairs(tracing.headers)
        if tracing.resource_attributes:
            env["OTEL_RESOURCE_ATTRIBUTES"] = _otel_pairs(tracing.resource_attributes)
        env["SGLANG_OTLP_EXPORTER_SCHEDULE_DELAY_MILLIS"] = str(tracing.export_interval_ms)
    return env


def _otel_pairs(pairs: dict[str, str]) -> str:
    """`key=value,...` as OpenTelemetry's environment variables carry them (values
    percent-encoded: a comma or `=` in one would split it)."""
    return ",".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs.items())


# our grammar backend, as pyproject.toml registers it for SGLang's processes to load
GRAMMAR_PLUGIN = ("sglang.srt.plugins", "small4_mistral_grammar")


def require_grammar_plugin() -> None:
    """Fail at start-up where SGLang would not find our grammar backend: it loads plugins from
    installed packages' entry points in each of its processes, so a host with SGLang but not
    this project installed (a checkout on `PYTHONPATH` is not, unless a build left its
    metadata there) starts, and then refuses every structured-output request (a 400 from its
    grammar manager, which has no backend of its own under `skip_tokenizer_init`). Nor where
    SGLang's `SGLANG_PLUGINS` allowlist leaves it out."""
    from importlib.metadata import entry_points

    group, name = GRAMMAR_PLUGIN
    if not any(point.name == name for point in entry_points(group=group)):
        raise RuntimeError(f"SGLang would not load this project's grammar backend (entry point "
                           f"{name} in {group}): install the project on this host, "
                           "pip install --no-deps . (or '.[sglang]')")
    allowed = os.environ.get("SGLANG_PLUGINS", "")  # SGLang's allowlist, when one is set
    if allowed.strip() and name not in {p.strip() for p in allowed.split(",")}:
        raise RuntimeError(f"SGLANG_PLUGINS={allowed!r} leaves out {name}, this project's "
                           "grammar backend: add it, or unset SGLANG_PLUGINS")


def require_transfer_backend(backend: str) -> None:
    """Fail at start-up, naming the extra, when the KV transfer library is not installed
    (SGLang itself declares no dependency on it and fails only when the first engine starts)."""
    import importlib

    module, extra = TRANSFER_PACKAGES[backend]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"engine.sglang.transfer_backend {backend} needs {module.split('.')[0]}"
                           f": pip install '.[{extra}]'") from exc


# SGLang samples greedily below this temperature (its sampling params' _SAMPLING_EPS)
GREEDY_BELOW = 1e-6


def sampling_args(request: EngineRequest, eos_ids: tuple[int, ...],
                  seeded: bool = False) -> dict[str, Any]:
    """SGLang `SamplingParams` keyword arguments for `request`. The seed goes only to an engine
    started `seeded` (deterministic inference): otherwise SGLang ignores it, and its flashinfer
    sampler refuses one; so a seed that would change a sampled answer there is refused (400),
    never dropped. Greedy answers (temperature 0) do not depend on it."""
    s = request.sampling
    if s.seed is not None and not seeded and s.temperature >= GREEDY_BELOW:
        raise InvalidRequest("seed: this deployment does not honour seed when sampling (its "
                             "SGLang engines run without engine.sglang.deterministic); send "
                             "no seed, or temperature 0", param="seed")
    params: dict[str, Any] = {
        "max_new_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "stop_token_ids": sorted(set(s.stop_token_ids) | (set() if s.ignore_eos
                                                          else set(eos_ids))),
        "ignore_eos": s.ignore_eos,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if seeded and s.seed is not None:
        params["sampling_seed"] = s.seed
    elif seeded and s.temperature >= GREEDY_BELOW:
        # deterministic SGLang seeds an unseeded request with 42: every sampled answer to a
        # prompt would be the same one, and a request's n choices identical. A seed of the
        # request's own: its prefill and decode engines agree, its choices and others differ.
        params["sampling_seed"] = request_seed(request.request_id)
    if s.logit_bias or s.banned_ids:
        params["logit_bias"] = {str(token): bias for token, bias in s.logit_bias} | {
            str(token): float("-inf") for token in s.banned_ids}
    if s.presence_penalty:
        params["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        params["frequency_penalty"] = s.frequency_penalty
    if s.grammar is not None:
        params["ebnf"] = grammar_key(s.grammar, s.stop_context)
    return params


def request_seed(request_id: str) -> int:
    """A sampling seed for a request that gave none: its id's (31 bits)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def grammar_key(grammar: str, history: tuple[int, ...] = ()) -> str:
    """What a request sends as SGLang's `ebnf`: our Lark grammar, after a comment line naming the
    tokens generated before this leg when it resumes a stream (the backend advances over them;
    llguidance would skip the line as a comment anyway). Also SGLang's grammar cache key."""
    if not history:
        return grammar
    return f"{ADVANCE_MARKER} {' '.join(map(str, history))}\n{grammar}"


def parse_grammar_key(key: str) -> tuple[str, tuple[int, ...]]:
    """`grammar_key`'s inverse: the grammar and the tokens to advance it over."""
    if not key.startswith(ADVANCE_MARKER):
        return key, ()
    head, _, grammar = key.partition("\n")
    return grammar, tuple(int(t) for t in head[len(ADVANCE_MARKER):].split())


def engine_rid(request_id: str, room: int) -> str:
    """The rid of one pairing attempt: SGLang aborts every rid that *starts with* the one given,
    and refuses a rid still active, so each attempt gets its own, ended by the room."""
    return f"{request_id}#{room}"


def generate_args(request: EngineRequest, eos_ids: tuple[int, ...], *,
                  images: list[Any] | None = None, seeded: bool = False) -> dict[str, Any]:
    """`Engine.async_generate` keyword arguments (streamed) for `request`."""
    missing = [f for f in BOOTSTRAP_FIELDS if f not in request.handoff]
    if missing:
        raise ValueError(f"request {request.request_id} has no PD pairing ({', '.join(missing)} "
                         "missing): SGLang engines run disaggregated")
    kwargs: dict[str, Any] = {
        "input_ids": list(request.prompt_ids),
        "sampling_params": sampling_args(request, eos_ids, seeded),
        "rid": engine_rid(request.request_id, request.handoff["bootstrap_room"]),
        "stream": True,
    }
    kwargs |= {f: request.handoff[f] for f in BOOTSTRAP_FIELDS}
    if request.sampling.logprobs is not None:  # the output tokens' logprobs only
        kwargs |= {"return_logprob": True, "top_logprobs_num": request.sampling.logprobs,
                   "logprob_start_len": -1}
    if request.trace_headers:
        kwargs["external_trace_header"] = dict(request.trace_headers)
    if images:
        kwargs["image_data"] = images
    return kwargs


def image_payload(prompt_ids: list[int], pixel_values: list[Any],
                  tokens: ImageTokens) -> list[dict[str, Any]]:
    """SGLang's `image_data` for a request's preprocessed images: one `processor_output` item
    (SGLang takes one per request) holding an (N, C, H, W) torch tensor (it hashes tensors, not
    numpy arrays) and the prompt's `[IMG]` runs, one per row of patches, as SGLang's processor
    finds them itself: every position of an offset is padded as a placeholder for one
    embedding, so an offset spanning a whole image (its `[IMG_BREAK]`s too) padded more
    placeholders than the tower made embeddings, and the forward pass failed, taking the engine
    with it. Its Mistral-native vision tower takes one size per item, so the multimodal
    service gives the images of a request one size (`uniform_image_sizes`) for this engine."""
    if not pixel_values:
        return []
    import numpy as np
    import torch

    sizes = {p.shape for p in pixel_values}
    if len(sizes) > 1:
        raise EngineError(f"images of {len(sizes)} sizes in one request: the SGLang engine "
                          "needs them made one size where the prompt is encoded")
    offsets = image_offsets(prompt_ids, tokens)
    if len(offsets) != len(pixel_values):
        raise InvalidRequest(f"the prompt holds {len(offsets)} image blocks for "
                             f"{len(pixel_values)} images", param="messages")
    rows = image_rows(prompt_ids, tokens)
    placeholders = sum(last - first + 1 for first, last in rows)
    embeddings = sum((p.shape[-2] // tokens.patch) * (p.shape[-1] // tokens.patch)
                     for p in pixel_values)
    if placeholders != embeddings:  # SGLang's forward pass would fail, taking its engine
        raise EngineError(f"the prompt's image blocks hold {placeholders} [IMG] for "
                          f"{embeddings} patches of its images")
    batch = torch.from_numpy(np.stack(pixel_values).astype(np.float32, copy=False))
    return [{"format": "processor_output", "pixel_values": batch,
             "image_sizes": [tuple(p.shape[-2:]) for p in pixel_values],
             "offsets": rows}]


class OutputReader:
    """Turns the dicts of one streamed `async_generate` into our token chunks.

    With `skip_tokenizer_init` each dict carries `output_ids`: cumulative by default (the same
    live list each time; a queue of them collapses to the latest), increments with
    `incremental_streaming_output`; the reader passes on each token once either way.
    """

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.seen = 0

    def new_tokens(self, out: dict[str, Any]) -> list[int]:
        ids = list(out.get("output_ids") or [])
        meta = out.get("meta_info") or {}
        total = meta.get("completion_tokens")
        if total is not None and len(ids) < total:  # increments: this dict holds only the new
            fresh = ids
        else:
            fresh = ids[self.seen:]
        self.seen += len(fresh)
        return fresh

    @staticmethod
    def logprobs(out: dict[str, Any], count: int) -> list[TokenLogprob] | None:
        """The logprobs of the last `count` tokens `new_tokens` passed on (SGLang's lists
        follow `output_ids`: cumulative or incremental alike, the new ones are at the end)."""
        meta = out.get("meta_info") or {}
        chosen = meta.get("output_token_logprobs")
        if not chosen or count == 0:
            return None
        tops = meta.get("output_top_logprobs") or [None] * len(chosen)
        return [TokenLogprob(int(token), float(logprob),
                             tuple((int(t), float(lp)) for lp, t, *_ in (top or ())))
                for (logprob, token, *_), top in zip(chosen[-count:], tops[-count:])]

    def finish(self, out: dict[str, Any]) -> FinishReason | None:
        """The finish reason once the request ended; SGLang's aborts raise our errors."""
        reason = (out.get("meta_info") or {}).get("finish_reason")
        if not reason:
            return None
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        if kind in ("stop", "length"):
            return kind
        message = reason.get("message", "") if isinstance(reason, dict) else ""
        raise engine_error(self.request_id, kind, message,
                           reason.get("status_code") if isinstance(reason, dict) else None)


# how SGLang's scheduler words its abort when a sampled token fails the request's grammar
# (`batch_result_processor.py`; a banned id's -inf bias over a grammar allowing nothing else)
GRAMMAR_REFUSED = "Grammar accept_token failed"


def engine_error(request_id: str, kind: str, message: str, status: int | None = None):
    """SGLang's abort of a request as our error: the client's fault (400) when SGLang says it
    was a bad request; a token its grammar would not take (it aborts the request with a 500,
    `GRAMMAR_REFUSED`) is the request's own, the same on any replica (500, not retried);
    otherwise a lost replica or transfer (retryable)."""
    text = f"SGLang ended {request_id}: {kind}" + (f" ({message})" if message else "")
    if status == 400:
        return InvalidRequest(text, request_id=request_id)
    # the marker anywhere: a non-streamed call (prefill's) raises it as `HTTPException: 500:
    # Grammar accept_token failed: …`, a stream ends with it as its abort's message
    if kind == "abort" and GRAMMAR_REFUSED not in (message or ""):
        return EngineUnavailable(text, request_id=request_id)
    return EngineError(text, request_id=request_id)
