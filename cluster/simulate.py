"""`small4 simulate`: the capacity planner. Replays trace files (or synthetic traces) through the
cluster simulator under each policy, writes JSON and a PNG, prints a table and the smallest
budget and split that meet the SLOs.

Exit codes: 0 done; 2 the input was refused (a bad trace file, an unknown policy or trace).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pydantic import ValidationError

from autoscaling.policy import PolicySettings
from autoscaling.simulator.prefix import PrefixModel
from autoscaling.simulator.report import PoolSLO
from autoscaling.simulator.scenario import CONTROLLERS, SimSettings
from autoscaling.simulator.study import (TraceSpec, answer, answer_line, default_workers,
                                         file_spec, prefix_rows, prefix_table, run_study,
                                         summarise, table, verdict, write)
from autoscaling.simulator.tracefile import TraceFileError, TraceSource
from autoscaling.simulator.workload import TRACES
from cluster.settings import SettingsError, load_settings

POLICIES = (*CONTROLLERS, "all")
# the hindsight reference tries every split of the budget (budget^4 of them): 64 takes
# seconds, 1000 would never end
MAX_BUDGET_ENGINES = 128


def add_arguments(parser) -> None:
    """The subcommand's options."""
    parser.add_argument("--trace", action="append", default=[], metavar="FILE[:EFFORT]",
                        help="CSV TIMESTAMP,ContextTokens,GeneratedTokens[,Effort]; repeat for "
                        "one file per pool (EFFORT: none, low, medium, high, ...)")
    parser.add_argument("--kind", action="append", choices=TRACES, default=[],
                        help="a synthetic trace (repeatable; default: steady when no --trace)")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="divide the trace files' time by this")
    parser.add_argument("--config", default=None, metavar="PROFILE",
                        help="a settings profile (YAML, as small4 up takes): its budget, "
                        "split, each role's min and max, SLOs, priorities and policy settings "
                        "instead of the production defaults (one pool per effort, none and "
                        "high; the performance model stays the H200 TP2 engine's)")
    parser.add_argument("--budget-engines", type=int, default=None,
                        help="engines (TP2, 2 GPUs each) all roles share; default 8, or the "
                        "profile's")
    parser.add_argument("--policy", choices=POLICIES, default="all")
    parser.add_argument("--seeds", type=int, default=1, help="request draws per synthetic trace")
    parser.add_argument("--out", default=".", help="directory for simulate.json and simulate.png")
    parser.add_argument("--no-answer", action="store_true",
                        help="skip the search for the smallest budget and split")
    parser.add_argument("--jobs", type=int, default=default_workers())
    parser.add_argument("--prefix-share", type=float, default=0.0, metavar="F",
                        help="share of each prompt that is a reusable prefix (0 to 1; 0: no "
                        "prefix cache): runs every policy with random and with cache-aware "
                        "routing and prints what routing buys")
    parser.add_argument("--prefix-groups", type=int, default=PrefixModel().groups,
                        help="distinct prefixes in use per pool (conversations, agents)")
    parser.add_argument("--prefix-cache-tokens", type=int,
                        default=PrefixModel().cache_tokens,
                        help="prefix cache per prefill engine, in tokens")


def progress(done: int, total: int, what: str) -> None:
    """One line per finished run, on stderr."""
    head = f"[{done}/{total}] " if total else ""
    print(f"{head}{what}", file=sys.stderr, flush=True)


def run(args) -> int:
    """The subcommand."""
    started = time.perf_counter()
    s = SimSettings()
    if args.config is not None:
        try:
            s = from_profile(s, load_settings(args.config))
        except (SettingsError, ValueError, OSError) as exc:
            print(f"small4 simulate: --config {args.config}: {exc}", file=sys.stderr)
            return 2
    if args.budget_engines is not None:
        s = _budget(s, args.budget_engines)
    lowest = sum(low for low, _ in s.bounds.values())
    if not max(4, lowest) <= s.budget_engines <= MAX_BUDGET_ENGINES:
        where = "--budget-engines" if args.budget_engines is not None else "the profile's budget"
        print(f"{where} must be 4 to {MAX_BUDGET_ENGINES} (one engine per pool and role at "
              f"least, and the roles' min_replicas, {lowest}); it is {s.budget_engines}",
              file=sys.stderr)
        return 2
    if args.seeds < 1 or args.jobs < 1:
        print(f"--{'seeds' if args.seeds < 1 else 'jobs'} must be at least 1", file=sys.stderr)
        return 2
    try:
        prefix = PrefixModel(share=args.prefix_share, groups=args.prefix_groups,
                             cache_tokens=args.prefix_cache_tokens)
    except ValidationError as exc:
        bad = exc.errors()[0]
        print(f"small4 simulate: --prefix-{str(bad['loc'][0]).replace('_tokens', '-tokens')}"
              f": {bad['msg']}", file=sys.stderr)
        return 2
    s = s.model_copy(update={"prefix": prefix})
    try:
        specs = [TraceSpec(k, kind=k) for k in args.kind]
        if args.trace:
            specs.append(file_spec([TraceSource.parse(t) for t in args.trace], args.speedup))
    except TraceFileError as exc:
        print(f"small4 simulate: {exc}", file=sys.stderr)
        return 2
    specs = specs or [TraceSpec("steady", kind="steady")]
    out = Path(args.out)
    try:  # before minutes of study, not when its results are written: a real write (as
        # root, os.access says yes to everything, /sys included)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("simulate.json", "simulate.png"):
            if (out / name).is_dir():
                raise IsADirectoryError(f"{out / name} is a directory")
        with tempfile.NamedTemporaryFile(dir=out, prefix=".small4-simulate-"):
            pass
    except OSError as exc:
        print(f"small4 simulate: --out {args.out}: not a directory this user can write "
              f"({exc.strerror or exc})", file=sys.stderr)
        return 2
    policies = list(CONTROLLERS) if args.policy == "all" else [args.policy]
    results = run_study(specs, policies, args.seeds, s, args.jobs, progress)
    rows = summarise(results, s)
    routing_rows = []
    if prefix.on:  # the same runs with cache-aware routing: what routing buys
        aware = s.model_copy(update={"prefix": prefix.model_copy(
            update={"routing": "cache-aware"})})
        routing_rows = prefix_rows(results, run_study(specs, policies, args.seeds, aware,
                                                      args.jobs, progress))
    # the answer looks up to twice the budget simulated (a traffic may need more than it)
    most = min(MAX_BUDGET_ENGINES, max(32, 2 * s.budget_engines))
    answers = [] if args.no_answer else [answer(spec, s, args.seeds, args.jobs, progress,
                                                max_budget=most) for spec in specs]
    document = {"settings": {"budget_engines": s.budget_engines, "static_split": s.static_split,
                             "slos": {k: v.model_dump() for k, v in s.slos.items()},
                             "cold_start_s": s.perf.cold_start_s},
                "seeds": args.seeds, "summary": rows, "targets": verdict(rows, s),
                "answers": answers, "runs": results, "prefix": {
                    **prefix.model_dump(), "by_routing": routing_rows} if prefix.on else None,
                "wall_s": round(time.perf_counter() - started, 1)}
    print(table(rows))
    print()
    if routing_rows:
        print(f"prefix {prefix.share:.0%} of each prompt, {prefix.groups} prefixes per pool, "
              f"{prefix.cache_tokens:,} tokens of cache per prefill engine (the table above: "
              "random routing):")
        print(prefix_table(routing_rows))
        print()
    for a in answers:
        print(answer_line(a))
    try:  # after the results are printed: a write that fails now loses none of them
        json_path, png = write(document, out)
    except OSError as exc:  # the directory changed under the study (full, removed)
        print(f"small4 simulate: --out {args.out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {json_path}" + (f" and {png}" if png else
                                 "; PNG skipped: matplotlib is not installed (pip install "
                                 "'small4-serve[dev]')"))
    return 0


def from_profile(s: SimSettings, stack) -> SimSettings:
    """`s` with a profile's pools as the simulator models them (the pool of effort `none` as
    `fast`, of `high` as `deep`): their start split, each role's bounds, SLOs, priorities,
    the GPU budget, the policy's and arbiter's settings, the prefill attempt deadline, and its
    engines' tensor parallelism and batch (still timed as SGLang on H200s: a profile of other
    engines is refused)."""
    by_effort: dict[str, list] = {}
    for pool in stack.pools.values():
        by_effort.setdefault(pool.effort, []).append(pool)
    if sorted(by_effort) != ["high", "none"] or any(len(p) > 1 for p in by_effort.values()):
        efforts = sorted(p.effort for p in stack.pools.values())
        raise ValueError("the simulator models one pool of effort none and one of high; "
                         f"this profile's pools serve {efforts}")
    if stack.engine.kind != "sglang":
        raise ValueError("the simulator times SGLang engines on H200 GPUs (autoscaling/"
                         f"perf.py); this profile's engines are {stack.engine.kind!r}: "
                         "its answer would not be this profile's")
    pools = {"fast": by_effort["none"][0], "deep": by_effort["high"][0]}
    roles = {f"{name}/{role}": getattr(pool, role) for name, pool in pools.items()
             for role in ("prefill", "decode")}
    return s.model_copy(update={
        "perf": stack.engine_perf(s.perf),  # the profile's engines, as production's policy
        "budget_engines": stack.budget_engines(),
        "static_split": {k: r.replicas for k, r in roles.items()},
        "bounds": {k: (r.lowest, r.highest) for k, r in roles.items()},
        "slos": {name: PoolSLO(ttft_s=p.slo.ttft_s, itl_s=p.slo.itl_s)
                 for name, p in pools.items()},
        "priorities": {name: p.priority for name, p in pools.items()},
        "policy": PolicySettings(**stack.autoscaling.policy.model_dump()),
        "arbiter": stack.autoscaling.arbiter,
        "prefill_timeout_s": stack.kv_handoff.prefill_timeout_s,
        "prefill_tokens_per_s_floor": stack.kv_handoff.prefill_tokens_per_s_floor})


def _budget(s: SimSettings, budget: int) -> SimSettings:
    """Settings with `budget` engines; the static split scaled to it, one engine per role at
    least."""
    split = s.split()
    total = sum(split.values())
    scaled = {k: max(1, round(n * budget / total)) for k, n in split.items()}
    while sum(scaled.values()) > budget:
        k = max(scaled, key=lambda k: scaled[k])
        scaled[k] -= 1
    while sum(scaled.values()) < budget:
        k = max(split, key=lambda k: split[k] * budget / total - scaled[k])
        scaled[k] += 1
    return s.model_copy(update={"budget_engines": budget, "static_split": {
        f"{p}/{r}": n for (p, r), n in scaled.items()}})


def main(argv: list[str] | None = None) -> int:
    """Run as `python -m cluster.simulate` (what `small4 simulate` calls)."""
    import argparse

    parser = argparse.ArgumentParser(prog="small4 simulate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

