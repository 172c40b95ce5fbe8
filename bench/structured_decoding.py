"""Decode tokens/s of the reference engine with a JSON-schema grammar enforced (llguidance
masks, batched over the running sequences) against the same requests unconstrained, at 1 and 32
concurrent, in the same run; and the grammar's own cost per token (mask computation, µs).

    python bench/structured_decoding.py [--tokens 64] [--concurrency 1 32] [--json-out FILE]

The schema is an array of at least 2000 small objects, so no constrained request ends before
`--tokens` (both sides decode the same number of tokens). Prints a JSON document and a table.
Target (issue 18): constrained >= 0.8x unconstrained tokens/s at each concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from services.engines.protocol import EngineRequest, SamplingParams  # noqa: E402
from services.engines.reference import ReferenceEngine  # noqa: E402
from services.grammar import Guidance, StructuredRequest  # noqa: E402
from services.model.loader import load_model  # noqa: E402
from services.settings import EngineSettings, ModelSettings  # noqa: E402
from services.tokenizer import PromptTokenizer  # noqa: E402

SCHEMA = {"type": "array", "minItems": 2000, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "ok", "tag"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                   "ok": {"type": "boolean"}, "tag": {"enum": ["red", "green", "blue"]}}}}


def prompt(tokenizer, i: int) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": f"request {i}: list things"}],
                                 effort="none").ids


async def decode(engine, tokenizer, concurrency: int, tokens: int,
                 grammar: str | None) -> dict:
    """Tokens/s of the decode phase for `concurrency` requests started together."""
    requests = [EngineRequest(f"r{i}-{grammar is not None}", prompt(tokenizer, i),
                              SamplingParams(max_tokens=tokens, temperature=1.0, seed=i,
                                             ignore_eos=grammar is None, grammar=grammar))
                for i in range(concurrency)]
    results = await asyncio.gather(*(engine.prefill(r) for r in requests))
    start = time.perf_counter()

    async def drain(request, result):
        ids = [result.first_token]
        async for chunk in engine.decode(request, result.first_token, result.kv):
            ids += chunk.token_ids
        return ids

    outputs = await asyncio.gather(*(drain(r, p) for r, p in zip(requests, results)))
    elapsed = time.perf_counter() - start
    produced = sum(len(ids) - 1 for ids in outputs)
    return {"tokens_per_s": produced / elapsed, "decode_tokens": produced, "outputs": outputs}


def mask_cost(guidance: Guidance, grammar: str, outputs: list[list[int]]) -> float:
    """µs per token to compute a mask and advance the grammar, replaying generated answers."""
    steps, start = 0, time.perf_counter()
    for ids in outputs:
        constraint = guidance.constraint(grammar)
        for token in ids:
            constraint.fill()
            constraint.advance(token)
            steps += 1
    return (time.perf_counter() - start) / max(steps, 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, bundle = PromptTokenizer(), load_model(ModelSettings())
    guidance = Guidance(tokenizer)
    started = time.perf_counter()
    grammar = guidance.grammar(StructuredRequest(response_format={
        "type": "json_schema", "json_schema": {"name": "things", "schema": SCHEMA}}))
    compile_ms = (time.perf_counter() - started) * 1000  # includes the tokenizer's first build
    engine = ReferenceEngine(bundle, EngineSettings(max_running_requests=64), role="both",
                             context_length=32768, eos_ids=(tokenizer.eos_id,),
                             detokenize=tokenizer.decode, guidance=guidance)
    rows, valid = [], True

    async def measure() -> None:  # one event loop: the engine's locks belong to it
        nonlocal valid
        for concurrency in args.concurrency:
            free = await decode(engine, tokenizer, concurrency, args.tokens, None)
            bound = await decode(engine, tokenizer, concurrency, args.tokens, grammar)
            valid &= all(len(ids) == args.tokens for ids in bound["outputs"])
            rows.append({"concurrency": concurrency,
                         "unconstrained_tokens_per_s": free["tokens_per_s"],
                         "constrained_tokens_per_s": bound["tokens_per_s"],
                         "ratio": bound["tokens_per_s"] / free["tokens_per_s"],
                         "mask_us_per_token": mask_cost(guidance, grammar, bound["outputs"])})

    asyncio.run(measure())
    report = {"bench": "structured_decoding", "model": "stand-in", "torch_threads": 1,
              "tokens_per_request": args.tokens, "grammar_first_build_ms": compile_ms,
              "constrained_outputs_full_length": valid, "rows": rows,
              "target": ">= 0.8x unconstrained tokens/s at every concurrency",
              "target_met": all(r["ratio"] >= 0.8 for r in rows)}
    print(json.dumps(report, indent=2))
    print(f"\n{'concurrency':>11} | {'free tok/s':>10} | {'json tok/s':>10} | {'ratio':>5} | "
          f"{'mask µs/tok':>11}")
    for r in rows:
        print(f"{r['concurrency']:>11} | {r['unconstrained_tokens_per_s']:10.1f} | "
              f"{r['constrained_tokens_per_s']:10.1f} | {r['ratio']:5.2f} | "
              f"{r['mask_us_per_token']:11.0f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
