"""Translation between our engine seam and SGLang 0.5.23's `sglang.Engine`, with no sglang
import, so it is tested on any machine (against SGLang's real classes where they import, and
against the signatures recorded in `tests/contract/sglang_0.5.23.json` elsewhere).

- `server_args`: the `ServerArgs` of one prefill or decode engine. The engine never sees text:
  `skip_tokenizer_init` makes it take and return token ids, so mistral-common's control tokens
  (`[THINK]`, `[TOOL_CALLS]`, images) survive and our parsers read the output.
- `generate_args`: one `async_generate` call: ids, sampling (`max_new_tokens` always set; stop
  strings are ours, since an engine without a tokenizer cannot match text), `rid` = our request
  id (needed to abort), the trace header, the PD bootstrap fields, preprocessed images.
- `OutputReader`: SGLang's output dicts to our token chunks and errors.
"""

from __future__ import annotations

from typing import Any

from services.engines.protocol import EngineRequest, FinishReason
from services.errors import EngineError, EngineUnavailable, InvalidRequest
from services.settings import ModelSettings, SGLangSettings

SGLANG_VERSION = "0.5.23"
BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


def server_args(model: ModelSettings, sglang: SGLangSettings, *, role: str, tp_size: int,
                max_running_requests: int, host: str, bootstrap_port: int | None,
                otlp_endpoint: str | None = None) -> dict[str, Any]:
    """`ServerArgs` keyword arguments of a `role` ("prefill" or "decode") engine."""
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
        "max_running_requests": max_running_requests,
        "chunked_prefill_size": sglang.chunked_prefill_size,
        "disaggregation_mode": role,
        "disaggregation_transfer_backend": sglang.transfer_backend,
        # the bootstrap server binds here: the node's routable address, never 127.0.0.1
        "host": host,
    }
    if role == "prefill":
        if bootstrap_port is None:
            raise ValueError("a prefill engine needs a KV bootstrap port")
        args["disaggregation_bootstrap_port"] = bootstrap_port
    if sglang.attention_backend:
        args["attention_backend"] = sglang.attention_backend
    if sglang.deterministic:
        args["enable_deterministic_inference"] = True
    if otlp_endpoint:
        args |= {"enable_trace": True, "otlp_traces_endpoint": otlp_endpoint}
    clash = sorted(set(sglang.server_args) & set(args))
    if clash:
        raise ValueError(f"engine.sglang.server_args may not set {', '.join(clash)}: the stack "
                         "sets them from its own settings")
    return args | sglang.server_args


def sampling_args(request: EngineRequest, eos_ids: tuple[int, ...],
                  seeded: bool = False) -> dict[str, Any]:
    """SGLang `SamplingParams` keyword arguments for `request`. The seed goes only to an engine
    started `seeded` (deterministic inference): otherwise SGLang ignores it, and its flashinfer
    sampler refuses one."""
    s = request.sampling
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
    return params


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
    if request.trace_headers:
        kwargs["external_trace_header"] = dict(request.trace_headers)
    if images:
        kwargs["image_data"] = images
    return kwargs


def image_data(pixel_values: list[Any]) -> list[dict[str, Any]]:
    """Our preprocessed images (mistral-common's CHW float32 arrays) as SGLang's
    `processor_output` item: the ids already hold the expanded `[IMG]` layout, so SGLang neither
    re-tokenises nor re-processes them (one such item per request and modality)."""
    if not pixel_values:
        return []
    return [{"format": "processor_output", "pixel_values": list(pixel_values),
             "image_sizes": [tuple(p.shape[-2:]) for p in pixel_values]}]


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


def engine_error(request_id: str, kind: str, message: str, status: int | None = None):
    """SGLang's abort of a request as our error: the client's fault (400) when SGLang says it
    was a bad request, a lost replica or transfer (retryable) otherwise."""
    text = f"SGLang ended {request_id}: {kind}" + (f" ({message})" if message else "")
    if status == 400:
        return InvalidRequest(text, request_id=request_id)
    if kind == "abort":
        return EngineUnavailable(text, request_id=request_id)
    return EngineError(text, request_id=request_id)
