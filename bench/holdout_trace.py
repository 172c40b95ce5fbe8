"""Write a trace file the autoscaling policy was never tuned on, in the public trace columns.

    python bench/holdout_trace.py OUT.csv [--minutes 60] [--seed 11]

Unlike the simulator's synthetic traces (Poisson arrivals, log-normal lengths, phases at a set
fraction of capacity), this one is drawn differently on purpose: arrivals in gamma-distributed
gaps (burstier than Poisson), Pareto-tailed prompts and Weibull outputs, and a working day in
an hour: chat traffic (`none`, `low`) rises and falls once, an agent fleet (`high`, `medium`)
starts half an hour in with long prompts and long reasoning outputs, and retrieval requests
(huge prompts, short answers) come in waves. It is replayed through `small4 simulate --trace`.
"""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np


def draw(minutes: float, seed: int) -> list[tuple[float, int, int, str]]:
    """(time s, prompt tokens, output tokens, effort) rows, sorted by time."""
    rng = np.random.default_rng(seed)
    end = minutes * 60.0
    rows: list[tuple[float, int, int, str]] = []

    def arrivals(rate, shape: float) -> np.ndarray:
        """Gamma gaps (shape < 1: bursty) thinned to `rate(t)`."""
        peak = max(rate(t) for t in np.linspace(0, end, 400)) * 1.01
        gaps = rng.gamma(shape, 1 / (peak * shape), int(peak * end * 1.5) + 100)
        times = np.cumsum(gaps)
        times = times[times < end]
        return times[rng.random(times.size) * peak < np.array([rate(t) for t in times])]

    chat = arrivals(lambda t: 10.0 + 12.0 * math.sin(math.pi * t / end), 0.5)
    prompts = np.minimum(300 * (1 + rng.pareto(1.6, chat.size)), 30000)
    outputs = np.minimum(rng.weibull(1.3, chat.size) * 280, 4000)
    rows += [(t, int(p), max(int(o), 2), "low" if i % 5 == 0 else "none")
             for i, (t, p, o) in enumerate(zip(chat, prompts, outputs))]

    agents = arrivals(lambda t: 4.5 if t > end / 2 else 0.8, 0.7)
    prompts = np.minimum(2500 * (1 + rng.pareto(2.0, agents.size)), 60000)
    outputs = np.minimum(rng.weibull(1.6, agents.size) * 3200, 12000)
    rows += [(t, int(p), max(int(o), 2), "medium" if i % 4 == 0 else "high")
             for i, (t, p, o) in enumerate(zip(agents, prompts, outputs))]

    def waves(t: float) -> float:
        return 5.0 if (t // 240) % 3 == 1 else 0.5

    retrieval = arrivals(waves, 0.8)
    prompts = np.minimum(9000 * (1 + rng.pareto(3.0, retrieval.size)), 64000)
    outputs = np.minimum(rng.weibull(1.2, retrieval.size) * 120, 1000)
    rows += [(t, int(p), max(int(o), 2), "none") for t, p, o in zip(retrieval, prompts, outputs)]
    return sorted(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens", "Effort"])
        writer.writerows((f"{t:.3f}", p, o, e) for t, p, o, e in draw(args.minutes, args.seed))


if __name__ == "__main__":
    main()
