"""Decode tokens/s of the reference engine with continuous batching at 1, 8 and 32 concurrent
requests, against sequential transformers `generate` on the same weights, in the same run; each
concurrency greedy and sampled (temperature 1, top_p 1: OpenAI's defaults, what a request that
names neither gets), so what sampling costs is measured against greedy in the same run.

    python bench/engine_decode.py [--tokens 64] [--concurrency 1 8 32] [--json-out FILE]

Prints a JSON document and a table. Target (issue 2): >= 4x the sequential baseline at 32,
greedy.
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
from services.model.loader import load_model  # noqa: E402
from services.settings import EngineSettings, ModelSettings  # noqa: E402
from services.tokenizer import PromptTokenizer  # noqa: E402


def prompt(tokenizer, i: int) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": f"request {i}: " + "tell me " * 12}],
                                 effort="none").ids


def sequential_generate(bundle, tokenizer, n_requests: int, tokens: int) -> float:
    """Tokens/s of `model.generate`, one request after another (the baseline), timed as the
    batched run is: prompts tokenised before, each prefill inside the window, after one untimed
    call (which warms the model for both: the batched runs come after this)."""
    prompts = [torch.tensor([prompt(tokenizer, i)]) for i in range(n_requests)]
    bundle.model.generate(prompts[0], max_new_tokens=2, do_sample=False)
    start, produced = time.perf_counter(), 0
    for ids in prompts:
        out = bundle.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                    do_sample=False)
        produced += out.shape[1] - ids.shape[1]
    return produced / (time.perf_counter() - start)


async def batched(bundle, tokenizer, concurrency: int, tokens: int,
                  temperature: float) -> dict:
    engine = ReferenceEngine(bundle, EngineSettings(), role="both", context_length=32768,
                             eos_ids=(tokenizer.eos_id,), detokenize=tokenizer.decode)
    requests = [EngineRequest(f"r{i}", prompt(tokenizer, i),
                              SamplingParams(max_tokens=tokens, temperature=temperature,
                                             seed=i, ignore_eos=True))
                for i in range(concurrency)]
    # the window holds the prefills, as the baseline's `generate` calls do
    start = time.perf_counter()
    results = await asyncio.gather(*(engine.prefill(r) for r in requests))

    async def drain(request, result):
        n = 1  # the prefill's token, as `generate`'s count has it
        async for chunk in engine.decode(request, result.first_token, result.kv):
            n += len(chunk.token_ids)
        return n

    produced = sum(await asyncio.gather(*(drain(r, p) for r, p in zip(requests, results))))
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "temperature": temperature, "tokens": produced,
            "tokens_per_s": produced / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer, bundle = PromptTokenizer(), load_model(ModelSettings())
    baseline = sequential_generate(bundle, tokenizer, args.baseline_requests, args.tokens)
    rows, sampled = [], []
    for c in args.concurrency:
        rows.append(asyncio.run(batched(bundle, tokenizer, c, args.tokens, 0.0)))
        sampled.append(asyncio.run(batched(bundle, tokenizer, c, args.tokens, 1.0)))
    for row, other in zip(rows, sampled):
        row["speedup_vs_generate"] = row["tokens_per_s"] / baseline
        other["over_greedy"] = other["tokens_per_s"] / row["tokens_per_s"]
    report = {"bench": "engine_decode", "model": "stand-in", "torch_threads": 1,
              "tokens_per_request": args.tokens, "baseline_generate_tokens_per_s": baseline,
              "batched": rows, "sampled": sampled,
              "target": ">= 4x baseline at 32 concurrent",
              "target_met": any(r["concurrency"] == 32 and r["speedup_vs_generate"] >= 4
                                for r in rows)}
    print(json.dumps(report, indent=2))
    print(f"\n{'mode':>22} | {'tokens/s':>9} | {'x generate':>10} | {'sampled tok/s':>13} | "
          "sampled/greedy")
    print(f"{'sequential generate':>22} | {baseline:9.1f} | {1.0:10.2f} |")
    for row, other in zip(rows, sampled):
        print(f"{'batched c=' + str(row['concurrency']):>22} | {row['tokens_per_s']:9.1f} | "
              f"{row['speedup_vs_generate']:10.2f} | {other['tokens_per_s']:13.1f} | "
              f"{other['over_greedy']:.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
