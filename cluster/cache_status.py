"""`small4 status`'s prefix-cache view: hit rate and KV held per prefill replica, read from Ray's
Prometheus endpoint (the gauges each prefill replica publishes after every prefill)."""

from __future__ import annotations

from collections import defaultdict

NAMES = {"ray_small4_prefix_cache_lookup_tokens": "lookup",
         "ray_small4_prefix_cache_hit_tokens": "hit",
         "ray_small4_prefix_cache_tokens": "held"}


def cache_rows(metrics_text: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """(pool, role, replica) → lookup, hit and held tokens, from a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    rows: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            field = NAMES.get(sample.name)
            if field is None:
                continue
            labels = sample.labels
            key = (labels.get("pool", "?"), labels.get("role", "?"), labels.get("replica", "?"))
            rows[key][field] = max(rows[key].get(field, 0.0), sample.value)
    return dict(rows)


def cache_table(rows: dict[tuple[str, str, str], dict[str, float]]) -> str:
    if not rows:
        return "prefix cache: no prefill has reported yet"
    lines = [f"{'pool/role':16s} {'replica':>10s} {'lookup tok':>11s} {'hit tok':>10s} "
             f"{'hit rate':>8s} {'held tok':>9s}"]
    for (pool, role, replica), r in sorted(rows.items()):
        lookup, hit = r.get("lookup", 0.0), r.get("hit", 0.0)
        rate = f"{100 * hit / lookup:.1f}%" if lookup else "-"
        lines.append(f"{pool + '/' + role:16s} {replica[-10:]:>10s} {lookup:11.0f} {hit:10.0f} "
                     f"{rate:>8s} {r.get('held', 0.0):9.0f}")
    return "\n".join(lines)
