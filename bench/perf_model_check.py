"""The simulator's performance model (`autoscaling/perf.py`) against one real
Mistral Small 4 decoder layer at the checkpoint's dimensions, on whatever device is here.

    python bench/perf_model_check.py [--smoke] [--prompt-tokens 2048 8192]
                                     [--prompts-per-batch 1]
                                     [--decode-batches 1 32 128] [--repeats 10]

The layer is transformers' own `Mistral4DecoderLayer` (MLA attention, 128 routed experts with
top-4 routing and one shared expert, `grouped_mm` experts, `sdpa` attention) with random bf16
weights, so routing is spread as the model assumes. Measured in the same run, as baselines: a
square bf16 matrix product, an FP8 one (`torch._scaled_mm`, where the device has it) and a
device-to-device copy.

- Prefill: P prompts of T tokens each through the layer in one forward. Its FLOPs are counted
  as the model counts them (`PerfModel.prompt_flops`, less `lm_head`, over 36 layers), so the
  achieved rate compares directly with the model's sustained `pflops_per_gpu x
  prefill_efficiency` (FP8, TP2). The FP8 projection scales the bf16 rate by the FP8/bf16 ratio
  of the two baseline products.
- Decode: one step of B sequences through the layer (replayed as a CUDA graph where it captures,
  so launches are not what is timed), with no KV context: the step reads the layer's weights and
  the distinct experts the router picked, the model's `always_read` and `expert_bytes` terms.
  Achieved bytes/s over the HBM datasheet rate compares with `decode_bandwidth_efficiency`.

Prints a JSON document and a table. `--smoke` runs a tiny layer (the test suite's check that the
bench still runs; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autoscaling.perf import PerfModel  # noqa: E402

LAYERS = 36  # the checkpoint's decoder layers (reference/model.md)
# datasheet HBM bandwidth (bytes/s) by device: what a measured read's efficiency divides (the
# model's own figure is the H200's); a device not listed is divided by the H200's and said so
HBM_DATASHEETS = {"H200": 4.8e12, "H100": 3.35e12}
HBM_DATASHEET = HBM_DATASHEETS["H200"]


def layer_device(layer) -> torch.device:
    return next(layer.parameters()).device


def hbm_datasheet(device_name: str) -> tuple[float, bool]:
    """(the datasheet bandwidth of `device_name`, whether it is known)."""
    for model, bandwidth in HBM_DATASHEETS.items():
        if model in device_name:
            return bandwidth, True
    return HBM_DATASHEET, False


def layer_config(smoke: bool):
    from transformers import Mistral4Config

    dims = (dict(hidden_size=64, moe_intermediate_size=32, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16,
                 qk_nope_head_dim=16, v_head_dim=32, vocab_size=1024) if smoke else {})
    config = Mistral4Config(num_hidden_layers=1, n_routed_experts=128, num_experts_per_tok=4,
                            n_shared_experts=1, max_position_embeddings=1048576, **dims)
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"
    return config


def build_layer(config, device: torch.device):
    """The real layer, random weights: the router too (zeros would send every token to the
    same four experts)."""
    from transformers.models.mistral4.modeling_mistral4 import (Mistral4DecoderLayer,
                                                                Mistral4RotaryEmbedding)

    with torch.device("meta"):
        layer = Mistral4DecoderLayer(config, layer_idx=0)
    layer = layer.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    rope = Mistral4RotaryEmbedding(config=config).to(device)
    return layer, rope


class Timer:
    """Seconds per call of `fn`: the median of `repeats` after warm-up, synchronised."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> float:
        for _ in range(2):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def baselines(device: torch.device, timer: Timer, smoke: bool) -> dict:
    """Matrix-product rates (bf16, FP8) and copy bandwidth of this device, same run."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = {"bf16_matmul_tflops": 2 * n**3 / timer(lambda: a @ b) / 1e12}
    try:
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.t().contiguous().to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        s = timer(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one,
                                           out_dtype=torch.bfloat16))
        out["fp8_matmul_tflops"] = 2 * n**3 / s / 1e12
    except (RuntimeError, NotImplementedError, TypeError) as err:
        out["fp8_matmul_tflops"], out["fp8_unavailable"] = None, str(err)[:200]
    size = (2**20 if smoke else 2**31) // 2  # bf16 elements: 2 MiB or 2 GiB
    src = torch.empty(size, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    out["copy_bytes_per_s"] = 2 * src.numel() * 2 / timer(lambda: dst.copy_(src))
    return out


def layer_matmul_flops_per_token(perf: PerfModel, vocab: int, hidden: int) -> float:
    """The model's per-token matmul FLOPs of one layer: its whole-model figure less `lm_head`."""
    return (perf.gflop_per_token * 1e9 - 2 * hidden * vocab) / LAYERS


def prefill(layer, rope, config, timer: Timer, tokens: int, prompts: int,
            perf: PerfModel) -> dict:
    """`prompts` prompts of `tokens` tokens each in one forward, as the engines batch them."""
    device = next(layer.parameters()).device
    x = torch.randn(prompts, tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    positions = torch.arange(tokens, device=device)[None].expand(prompts, -1)
    cos_sin = rope(x, positions)

    def step():
        with torch.no_grad():
            layer(x, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)

    seconds = timer(step)
    per_token = (layer_matmul_flops_per_token(perf, config.vocab_size, config.hidden_size)
                 + perf.gflop_per_token_per_context_token * 1e9 * tokens / LAYERS)
    return {"tokens": tokens, "prompts": prompts, "layer_s": seconds,
            "achieved_bf16_tflops": per_token * tokens * prompts / seconds / 1e12,
            "model_tokens_per_s_per_gpu_bf16": tokens * prompts / (LAYERS * seconds)}


def graphed(fn, device: torch.device):
    """`fn` replayed as a CUDA graph when it captures (launch overhead is not what the model's
    bandwidth term describes), else `fn` itself; with the mode used."""
    if device.type != "cuda":
        return fn, "eager"
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, "cuda_graph"
    except RuntimeError as err:  # a host sync inside the experts' dispatch, say
        print(f"decode step not graph-capturable ({str(err)[:120]}); timing it eagerly",
              file=sys.stderr)
        return fn, "eager"


def decode(layer, rope, config, timer: Timer, batch: int, perf: PerfModel) -> dict:
    device = next(layer.parameters()).device
    x = torch.randn(batch, 1, config.hidden_size, device=device, dtype=torch.bfloat16)
    positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
    cos_sin = rope(x, positions)
    picked: list[torch.Tensor] = []
    hook = layer.mlp.gate.register_forward_hook(lambda _m, _i, out: picked.append(out[2]))
    with torch.no_grad():
        layer(x, position_ids=positions, position_embeddings=cos_sin)
    hook.remove()
    distinct = int(picked[0].unique().numel())

    def step():
        with torch.no_grad():
            layer(x, position_ids=positions, position_embeddings=cos_sin)

    fn, mode = graphed(step, device)
    seconds = timer(fn)
    experts = layer.mlp.experts
    per_expert = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 2
    expert_total = (experts.gate_up_proj.numel() + experts.down_proj.numel()) * 2
    fixed = sum(p.numel() * p.element_size() for p in layer.parameters()) - expert_total
    read = fixed + distinct * per_expert
    # the model's own step for the same reads (bf16 weights: twice its FP8 bytes; one GPU; no
    # KV context), over the whole model, against 36 measured layers
    # this device's bandwidth (the model's is the H200's)
    datasheet, _ = hbm_datasheet(torch.cuda.get_device_name(layer_device(layer))
                                 if layer_device(layer).type == "cuda" else "")
    bf16 = perf.model_copy(update={
        "gpus_per_engine": 1, "always_read_bytes": 2 * perf.always_read_bytes,
        "expert_bytes": 2 * perf.expert_bytes, "hbm_bytes_per_s_per_gpu": datasheet})
    return {"batch": batch, "mode": mode, "distinct_experts": distinct,
            "model_distinct_experts": round(perf.experts * (
                1 - (1 - perf.experts_per_token / perf.experts) ** batch), 1),
            "layer_s": seconds, "layer_bytes": read, "achieved_bytes_per_s": read / seconds,
            "hbm_efficiency": read / seconds / datasheet,
            "model_step_s_bf16_1gpu": bf16.decode_step_s(batch, 0.0),
            "measured_layers_s": LAYERS * seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny layer: checks it runs")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--prompts-per-batch", type=int, nargs="+", default=[1],
                        help="prompts per prefill forward (each size with each count)")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", help="also write the JSON document here")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    timer, perf = Timer(device, args.repeats), PerfModel()
    config = layer_config(args.smoke)
    layer, rope = build_layer(config, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {
        "device": name,
        "hbm_datasheet_bytes_per_s": hbm_datasheet(name)[0],
        "hbm_datasheet_known": hbm_datasheet(name)[1],
        "torch": torch.__version__, "smoke": args.smoke,
        "model": {"pflops_per_gpu": perf.pflops_per_gpu,
                  "prefill_efficiency": perf.prefill_efficiency,
                  "sustained_fp8_tflops_per_gpu":
                      perf.pflops_per_gpu * perf.prefill_efficiency * 1e3,
                  "decode_bandwidth_efficiency": perf.decode_bandwidth_efficiency},
        "baselines": baselines(device, timer, args.smoke),
        "prefill": [prefill(layer, rope, config, timer, t, n, perf)
                    for t in args.prompt_tokens for n in args.prompts_per_batch],
        "decode": [decode(layer, rope, config, timer, b, perf) for b in args.decode_batches],
    }
    ratio = ((report["baselines"]["fp8_matmul_tflops"] or math.nan)
             / report["baselines"]["bf16_matmul_tflops"])
    for row in report["prefill"]:
        row["fp8_projection_tflops"] = row["achieved_bf16_tflops"] * ratio
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)

    b = report["baselines"]
    print(f"\n{report['device']}: bf16 matmul {b['bf16_matmul_tflops']:.0f} TFLOP/s, fp8 "
          f"{b['fp8_matmul_tflops'] or math.nan:.0f}, copy {b['copy_bytes_per_s'] / 1e12:.2f} "
          "TB/s (read + written)")
    print(f"model: prefill {report['model']['sustained_fp8_tflops_per_gpu']:.0f} TFLOP/s per "
          f"GPU sustained (FP8, TP2); decode at {perf.decode_bandwidth_efficiency:.0%} of HBM")
    print(f"{'prefill T':>10} {'prompts':>8} {'layer ms':>9} {'bf16 TF/s':>10} {'fp8 proj':>9} "
          f"{'tok/s/GPU':>10}")
    for r in report["prefill"]:
        print(f"{r['tokens']:>10} {r['prompts']:>8} {r['layer_s'] * 1e3:>9.2f} "
              f"{r['achieved_bf16_tflops']:>10.0f} {r['fp8_projection_tflops']:>9.0f} "
              f"{r['model_tokens_per_s_per_gpu_bf16']:>10.0f}")
    print(f"{'decode B':>10} {'mode':>10} {'experts':>8} {'layer ms':>9} {'HBM eff':>8} "
          f"{'36 layers ms':>13} {'model ms':>9}")
    for r in report["decode"]:
        print(f"{r['batch']:>10} {r['mode']:>10} {r['distinct_experts']:>8} "
              f"{r['layer_s'] * 1e3:>9.3f} {r['hbm_efficiency']:>8.2f} "
              f"{r['measured_layers_s'] * 1e3:>13.2f} {r['model_step_s_bf16_1gpu'] * 1e3:>9.2f}")


if __name__ == "__main__":
    main()
