"""The SGLang adapter's translation on the CPU: our settings and requests to SGLang 0.5.23's
`ServerArgs`, `SamplingParams` and `async_generate` arguments, SGLang's outputs and aborts to our
chunks and errors, the PD pairing fields, the bootstrap port choice. Checked against SGLang's
real classes where sglang imports (GPU hosts with the extra), else against the signatures
recorded from its source in `sglang_0.5.23.json`. Starting an engine is left to the `gpu` tests.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.settings import load_settings, parse_settings
from services.engines.protocol import EngineRequest, SamplingParams
from services.engines.sglang_args import (BOOTSTRAP_FIELDS, GRAMMAR_BACKEND, OutputReader,
                                          engine_error, generate_args, parse_grammar_key,
                                          sampling_args, server_args)
from services.errors import EngineError, EngineUnavailable, InvalidRequest
from services.settings import PrefixCacheSettings

RECORDED = json.loads((Path(__file__).parent / "sglang_0.5.23.json").read_text())
PROFILE = load_settings("cluster/profiles/h200x16.yaml")
PAIRING = {"bootstrap_host": "10.0.0.7", "bootstrap_port": 8999, "bootstrap_room": 12345}


def real_names(kind: str) -> set[str] | None:
    """Parameter names of SGLang's own class or method, when sglang imports here."""
    try:
        if kind == "server_args":
            from sglang.srt.server_args import ServerArgs
            return set(inspect.signature(ServerArgs).parameters)
        if kind == "sampling_params":
            from sglang.srt.sampling.sampling_params import SamplingParams as Theirs
            return set(inspect.signature(Theirs).parameters)
        from sglang.srt.entrypoints.engine import Engine
        return set(inspect.signature(Engine.async_generate).parameters)
    except ImportError:
        return None


def names(kind: str) -> set[str]:
    return real_names(kind) or set(RECORDED[kind])


def request(**sampling) -> EngineRequest:
    return EngineRequest("chatcmpl-1", [1, 5, 6, 7], SamplingParams(**({"max_tokens": 8}
                                                                       | sampling)),
                         trace_headers={"traceparent": "00-ab-cd-01"}, handoff=dict(PAIRING))


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_server_args_are_sglang_fields_from_the_profile(role):
    worker = PROFILE.worker("fast")
    args = server_args(worker.model, worker.engine, role=role, tp_size=worker.tensor_parallel,
                       host="10.0.0.7", bootstrap_port=8999 if role == "prefill" else None)
    assert set(args) <= names("server_args"), set(args) - names("server_args")
    assert args["tp_size"] == 2 and args["disaggregation_mode"] == role
    assert args["skip_tokenizer_init"] is True and args["host"] == "10.0.0.7"
    assert args["grammar_backend"] == GRAMMAR_BACKEND
    assert "mistral-small-4" in args["model_path"]
    assert ("disaggregation_bootstrap_port" in args) == (role == "prefill")
    assert args["dtype"] == "bfloat16"  # the profile names it
    assert "random_seed" not in args  # it names none: SGLang draws one per launch
    unset = worker.model.model_copy()
    unset.__pydantic_fields_set__.discard("dtype")  # the CPU stand-in's float32 default
    assert "dtype" not in server_args(unset, worker.engine, role=role, tp_size=2, host="h",
                                      bootstrap_port=1)
    assert "disable_radix_cache" not in args
    engine = worker.engine.model_copy(update={"prefix_cache": PrefixCacheSettings(enabled=False)})
    assert server_args(worker.model, engine, role=role, tp_size=2, host="h",
                       bootstrap_port=1)["disable_radix_cache"] is True


def test_server_args_refuse_overriding_what_the_stack_sets():
    worker = PROFILE.worker("fast")
    sglang = worker.engine.sglang.model_copy(update={"server_args": {"tp_size": 4}})
    engine = worker.engine.model_copy(update={"sglang": sglang})
    with pytest.raises(ValueError, match="may not set tp_size"):
        server_args(worker.model, engine, role="decode", tp_size=2, host="h",
                    bootstrap_port=None)


def test_generate_args_send_ids_rid_pairing_and_trace():
    kwargs = generate_args(request(temperature=0.0, seed=7, stop=("END",)), (2,))
    assert set(kwargs) <= names("async_generate"), set(kwargs) - names("async_generate")
    assert kwargs["input_ids"] == [1, 5, 6, 7] and kwargs["rid"] == "chatcmpl-1#12345"
    assert {f: kwargs[f] for f in BOOTSTRAP_FIELDS} == PAIRING
    assert kwargs["external_trace_header"] == {"traceparent": "00-ab-cd-01"}
    assert "prompt" not in kwargs and "image_data" not in kwargs


def test_sampling_keeps_control_tokens_and_always_sets_max_new_tokens():
    params = sampling_args(request(temperature=0.5, top_p=0.9, seed=3,
                                   stop_token_ids=(9,)), (2,), seeded=True)
    assert set(params) <= names("sampling_params"), set(params) - names("sampling_params")
    assert params["max_new_tokens"] == 8 and params["skip_special_tokens"] is False
    assert params["stop_token_ids"] == [2, 9] and params["sampling_seed"] == 3
    # an engine not started deterministic ignores seeds, and its default sampler refuses one:
    # a seed that would change a sampled answer is refused, naming it; greedy needs none
    for greedy in (0.0, 1e-7):  # SGLang samples greedily below 1e-6
        assert "sampling_seed" not in sampling_args(request(seed=3, temperature=greedy), (2,))
    with pytest.raises(InvalidRequest) as refused:
        sampling_args(request(seed=3, temperature=0.7), (2,))
    assert refused.value.param == "seed" and refused.value.status == 400
    assert "stop" not in params  # stop strings are matched by us, on ids
    assert sampling_args(request(ignore_eos=True), (2,))["stop_token_ids"] == []


def test_a_deterministic_engine_gets_a_seed_of_each_requests_own_when_it_sent_none():
    """Deterministic SGLang seeds an unseeded request with 42 (`SamplingBatchInfo`): every
    sampled answer to a prompt was the same, and the n choices of a request identical."""
    from dataclasses import replace

    sampled = request(temperature=0.8)
    seeds = {sampling_args(replace(sampled, request_id=rid), (2,), seeded=True)["sampling_seed"]
             for rid in ("chatcmpl-1", "chatcmpl-1-1", "chatcmpl-1-2", "chatcmpl-2")}
    assert len(seeds) == 4 and all(0 <= seed < 2 ** 31 for seed in seeds)
    again = sampling_args(sampled, (2,), seeded=True)["sampling_seed"]
    assert again == sampling_args(sampled, (2,), seeded=True)["sampling_seed"]  # both engines
    assert "sampling_seed" not in sampling_args(request(temperature=0.0), (2,), seeded=True)
    assert sampling_args(request(temperature=0.8, seed=5), (2,), seeded=True)[
        "sampling_seed"] == 5


def test_each_pairing_attempt_has_an_rid_no_other_starts_with():
    first = generate_args(request(), (2,))["rid"]
    resumed = EngineRequest("chatcmpl-1-resume1", [1], SamplingParams(max_tokens=1),
                            handoff=PAIRING | {"bootstrap_room": 99})
    assert not generate_args(resumed, (2,))["rid"].startswith(first)


def test_a_request_without_pairing_is_refused():
    with pytest.raises(ValueError, match="bootstrap_room"):
        generate_args(EngineRequest("r", [1], SamplingParams(max_tokens=1)), (2,))


def test_output_reader_takes_cumulative_or_incremental_ids():
    cumulative = OutputReader("r")
    assert cumulative.new_tokens({"output_ids": [4], "meta_info": {"completion_tokens": 1}}) == [4]
    assert cumulative.new_tokens({"output_ids": [4, 5, 6],
                                  "meta_info": {"completion_tokens": 3}}) == [5, 6]
    incremental = OutputReader("r")
    assert incremental.new_tokens({"output_ids": [4], "meta_info": {"completion_tokens": 1}}) == [4]
    assert incremental.new_tokens({"output_ids": [5, 6],
                                   "meta_info": {"completion_tokens": 3}}) == [5, 6]


def test_finish_reasons_and_aborts_map_to_ours():
    reader = OutputReader("r")
    assert reader.finish({"meta_info": {"finish_reason": None}}) is None
    assert reader.finish({"meta_info": {"finish_reason": {"type": "length", "length": 8}}}) \
        == "length"
    assert reader.finish({"meta_info": {"finish_reason": {"type": "stop", "matched": 2}}}) \
        == "stop"
    with pytest.raises(EngineUnavailable, match="KVTransferError"):
        reader.finish({"meta_info": {"finish_reason": {"type": "abort",
                                                       "message": "KVTransferError"}}})
    with pytest.raises(InvalidRequest):
        reader.finish({"meta_info": {"finish_reason": {"type": "abort", "status_code": 400,
                                                       "message": "too long"}}})
    # a token the grammar refused fails alike on every replica: not retried, whether a
    # stream's abort says so or a non-streamed call (prefill's) raises it
    with pytest.raises(EngineError, match="accept_token"):
        reader.finish({"meta_info": {"finish_reason": {
            "type": "abort", "status_code": 500,
            "message": "Grammar accept_token failed: token 34 is not allowed"}}})
    raised = engine_error("r", "abort", "HTTPException: 500: Grammar accept_token failed: x")
    assert type(raised) is EngineError


def test_sglang_engine_and_handoff_go_together_on_gpus():
    base = {"auth": {"enabled": False}}
    with pytest.raises(Exception, match="go together"):
        parse_settings(base | {"engine": {"kind": "sglang"}})
    with pytest.raises(Exception, match="needs GPUs"):
        parse_settings(base | {"engine": {"kind": "sglang"},
                               "kv_handoff": {"backend": "sglang"}})
    assert PROFILE.engine.kind == "sglang" and PROFILE.engine.sglang.transfer_backend == "nixl"


def test_sampling_controls_and_logprobs_are_sglangs_fields():
    """logit_bias keyed by token id strings, penalties as given, and the output tokens'
    logprobs (with `top_logprobs_num` alternatives) asked of `async_generate`."""
    req = request(logit_bias=((17, 5.0), (900, -100.0)), presence_penalty=0.5,
                  frequency_penalty=-1.0, logprobs=3)
    params = sampling_args(req, (2,))
    assert set(params) <= names("sampling_params"), set(params) - names("sampling_params")
    assert params["logit_bias"] == {"17": 5.0, "900": -100.0}
    assert (params["presence_penalty"], params["frequency_penalty"]) == (0.5, -1.0)
    kwargs = generate_args(req, (2,))
    assert set(kwargs) <= names("async_generate"), set(kwargs) - names("async_generate")
    assert (kwargs["return_logprob"], kwargs["top_logprobs_num"]) == (True, 3)
    assert "return_logprob" not in generate_args(request(), (2,))
    sglang_accepts(params)


def test_a_banned_id_is_a_logit_bias_no_client_bias_can_outweigh():
    """SGLang has no ban of its own: a banned id (the call marker where no tools are offered)
    is a -inf bias, over a client's own bias for the same id."""
    params = sampling_args(request(logit_bias=((17, 5.0), (900, 100.0)), banned_ids=(900,)),
                           (2,))
    assert params["logit_bias"] == {"17": 5.0, "900": float("-inf")}
    assert sampling_args(request(banned_ids=(900,)), (2,))["logit_bias"] == {
        "900": float("-inf")}
    sglang_accepts(params)


def test_a_grammar_goes_as_ebnf_and_a_resumed_leg_names_the_tokens_before_it():
    """The Lark grammar is SGLang's `ebnf` (llguidance reads Lark there); a resumed leg's key
    carries the tokens generated before it, which our backend advances the grammar over."""
    lark = 'start: "yes" | "no"'
    params = sampling_args(request(grammar=lark), (2,))
    assert set(params) <= names("sampling_params"), set(params) - names("sampling_params")
    assert params["ebnf"] == lark and parse_grammar_key(params["ebnf"]) == (lark, ())
    resumed = sampling_args(request(grammar=lark, stop_context=(5, 60, 700)), (2,))["ebnf"]
    assert resumed != lark and parse_grammar_key(resumed) == (lark, (5, 60, 700))
    assert "ebnf" not in sampling_args(request(), (2,))
    sglang_accepts(params)


def sglang_accepts(params: dict) -> None:
    """SGLang's own checks of sampling values, where it imports."""
    try:
        from sglang.srt.sampling.sampling_params import SamplingParams as Theirs
    except ImportError:
        return
    theirs = Theirs(**params)
    theirs.normalize(None)
    theirs.verify(131072)


def test_output_reader_takes_the_new_tokens_logprobs():
    """SGLang's logprob lists follow `output_ids`, cumulative or not: the last ones are new."""
    out = {"output_ids": [4, 5, 6], "meta_info": {
        "completion_tokens": 3,
        "output_token_logprobs": [(-0.1, 4, None), (-0.2, 5, None), (-0.3, 6, None)],
        "output_top_logprobs": [[(-0.1, 4, None)], [(-0.2, 5, None), (-1.0, 8, None)],
                                [(-0.3, 6, None), (-2.0, 9, None)]]}}
    got = OutputReader.logprobs(out, 2)
    assert [(r.token, r.logprob) for r in got] == [(5, -0.2), (6, -0.3)]
    assert got[1].top == ((6, -0.3), (9, -2.0))
    assert OutputReader.logprobs({"output_ids": [4], "meta_info": {}}, 1) is None


class _Outputs:
    """What SGLang's `async_generate(stream=True)` hands back: an async iterator of dicts."""

    def __init__(self, *outs):
        self.outs = list(outs)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.outs:
            raise StopAsyncIteration
        return self.outs.pop(0)

    async def aclose(self):
        pass


def _decode_stream(generate):
    """A `DecodeStream` on an engine whose SGLang side is `generate` (no sglang import)."""
    from types import SimpleNamespace

    from services.engines.sglang_engine import DecodeStream, SGLangEngine

    engine = SGLangEngine.__new__(SGLangEngine)
    engine.eos_ids, engine.detokenize, engine.marks, engine.seeded = (2,), str, None, False
    engine.live, engine.aborted = {}, []

    async def async_generate(**kwargs):
        return await generate(**kwargs)

    engine.engine = SimpleNamespace(async_generate=async_generate,
                                    tokenizer_manager=SimpleNamespace(
                                        abort_request=lambda rid: engine.aborted.append(rid)))
    return engine, DecodeStream(engine, request(), dict(PAIRING))


def test_a_decode_whose_kv_never_came_or_that_sglang_refused_fails_at_its_start():
    """SGLang reports a failed bootstrap or KV transfer on the decode side as a first output
    that is an abort (not an exception): the pairing fails there, retryably, instead of being
    taken for the KV's arrival; a request SGLang refuses (ValueError) is the client's 400."""
    import asyncio

    aborted = {"output_ids": [], "meta_info": {"finish_reason": {
        "type": "abort", "message": "KVTransferError", "status_code": 500}}}

    async def transfer_failed(**_):
        return _Outputs(aborted)

    async def refused(**_):
        raise ValueError("logit_bias token 999999 is out of the vocabulary")

    async def arrived(**_):
        return _Outputs({"output_ids": [7], "meta_info": {"completion_tokens": 1}})

    for generate, error in ((transfer_failed, EngineUnavailable), (refused, InvalidRequest)):
        engine, stream = _decode_stream(generate)
        with pytest.raises(error):
            asyncio.run(engine.open_decode(stream.request, dict(PAIRING)))
        assert engine.live == {}  # nothing of it left behind
    engine, stream = _decode_stream(arrived)
    opened = asyncio.run(engine.open_decode(stream.request, dict(PAIRING)))
    assert opened.head["output_ids"] == [7]


def test_a_cancelled_prefill_attempt_aborts_its_own_rid_not_its_retrys():
    """A retry in a new room can reach the same prefill engine before the cancellation of the
    attempt it replaces (same request id, another rid): the cancelled attempt aborts its own
    rid and leaves the retry running and counted."""
    import asyncio

    from services.multimodal.uniform import ImageTokens
    from services.tokenizer import load_tokenizer

    engine, _ = _decode_stream(None)
    engine.image_tokens = ImageTokens.of(load_tokenizer(None))
    release = {}

    async def async_generate(**kwargs):
        release[kwargs["rid"]] = asyncio.Event()
        await release[kwargs["rid"]].wait()
        return {"output_ids": [7], "meta_info": {"finish_reason": {"type": "length"}}}

    engine.engine.async_generate = async_generate

    async def scenario():
        first = asyncio.ensure_future(engine.prefill(request()))
        await asyncio.sleep(0.01)
        retry = replace(request(), handoff=dict(PAIRING) | {"bootstrap_room": 777})
        second = asyncio.ensure_future(engine.prefill(retry))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert engine.aborted == ["chatcmpl-1#12345"]
        assert engine.live == {"chatcmpl-1": ["chatcmpl-1#777", 4]}  # the retry's, still live
        release["chatcmpl-1#777"].set()
        await second
        assert engine.live == {}

    asyncio.run(scenario())


def test_an_engine_host_without_our_grammar_backend_installed_fails_at_start(monkeypatch):
    """SGLang loads plugins from installed entry points only (and of those, what its
    `SGLANG_PLUGINS` allowlist names): a GPU host running the project from its source started,
    then answered every structured-output request with SGLang's 400 (no grammar backend).
    The entry point checked is pyproject's."""
    import importlib.metadata
    import tomllib
    from types import SimpleNamespace

    from services.engines import sglang_args

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    group, name = sglang_args.GRAMMAR_PLUGIN
    assert project["project"]["entry-points"][group][name] == \
        "services.engines.sglang_grammar:install"
    installed = [SimpleNamespace(name="other"), SimpleNamespace(name=name)]
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: installed if group == sglang_args.GRAMMAR_PLUGIN[0] else [])
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    sglang_args.require_grammar_plugin()
    monkeypatch.setenv("SGLANG_PLUGINS", f"other, {name}")
    sglang_args.require_grammar_plugin()
    monkeypatch.setenv("SGLANG_PLUGINS", "other")
    with pytest.raises(RuntimeError, match="leaves out"):
        sglang_args.require_grammar_plugin()
    monkeypatch.delenv("SGLANG_PLUGINS")
    installed.pop()
    with pytest.raises(RuntimeError, match="pip install --no-deps"):
        sglang_args.require_grammar_plugin()
