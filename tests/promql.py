"""Run the chart's alert expressions against given rates: Prometheus's grammar (promql-parser,
the Rust parser Prometheus-compatible databases use) reads the expression, and this walks its
tree for the part of PromQL the rules use — selectors (a gauge's value, or under `rate()`),
`sum [by (...)]`,
`vector()`, arithmetic, `or`/`and`, comparisons with a number. A rule is tested on what it
fires on, not on its text: an empty series (a counter nobody has incremented yet) makes a whole
expression empty unless the rule says `or vector(0)`, which only an evaluation shows.

Series are given as `(name, labels, value)`: a gauge's value, or a counter's per-second rate,
`rate(x[w])` of it whatever `w` is (`increase(x[w])`: that rate times `w`). Outside that subset the walker raises, so a rule that starts
using more of the language fails its test instead of being read wrong.
"""

from __future__ import annotations

import math
import re

import promql_parser as pq

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Series = tuple[str, dict[str, str], float]


def evaluate(expr: str, series: list[Series]) -> Vector | float:
    """The expression's value: an instant vector (labels to value) or a number."""
    return _eval(pq.parse(expr), series)


def fires(expr: str, series: list[Series]) -> bool:
    """An alert fires when its expression returns at least one series."""
    value = evaluate(expr, series)
    if not isinstance(value, dict):
        raise TypeError(f"an alert expression must be a vector, not {value!r}")
    return bool(value)


def _matches(matcher, labels: dict[str, str]) -> bool:
    value = labels.get(matcher.name, "")
    if matcher.op == pq.MatchOp.Equal:
        return value == matcher.value
    if matcher.op == pq.MatchOp.NotEqual:
        return value != matcher.value
    found = re.fullmatch(matcher.value, value) is not None  # Prometheus anchors its regexes
    return found if matcher.op == pq.MatchOp.Re else not found


def _select(selector, series: list[Series], named: bool = False) -> Vector:
    """The matching series; an instant selector keeps the metric's name as a label (`rate()`
    drops it), which vector matching then ignores, as Prometheus does."""
    if selector.offset is not None or selector.at is not None or \
            selector.matchers.or_matchers:
        raise NotImplementedError(f"selector {selector}")
    return {frozenset(labels.items()) | ({("__name__", name)} if named else set()): value
            for name, labels, value in series
            if name == selector.name and all(_matches(m, labels)
                                             for m in selector.matchers.matchers)}


def _bare(labels: Labels) -> Labels:
    return frozenset((k, v) for k, v in labels if k != "__name__")


def _divide(a: float, b: float) -> float:
    if b:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)


ARITHMETIC = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
              "/": _divide}
COMPARISON = {">": lambda a, b: a > b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b,
              "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


def _eval(node, series: list[Series]) -> Vector | float:
    if isinstance(node, pq.ParenExpr):
        return _eval(node.expr, series)
    if isinstance(node, pq.NumberLiteral):
        return float(node.val)
    if isinstance(node, pq.VectorSelector):
        return _select(node, series, named=True)
    if isinstance(node, pq.Call):
        name, args = node.func.name, node.args
        if name in ("rate", "increase") and isinstance(args[0], pq.MatrixSelector):
            rates = _select(args[0].vector_selector, series)
            if name == "rate":
                return rates
            seconds = args[0].range.total_seconds()
            return {k: v * seconds for k, v in rates.items()}
        if name == "vector":
            value = _eval(args[0], series)
            if isinstance(value, dict):
                raise TypeError("vector() takes a number")
            return {frozenset(): value}
        raise NotImplementedError(f"function {name}")
    if isinstance(node, pq.AggregateExpr):
        if str(node.op) != "sum" or node.param is not None:
            raise NotImplementedError(f"aggregation {node.op}")
        inner = _eval(node.expr, series)
        if not isinstance(inner, dict):
            raise TypeError("sum() takes a vector")
        modifier = node.modifier
        if modifier is not None and str(modifier.type) != "AggModifierType.By":
            raise NotImplementedError(f"aggregation modifier {modifier}")
        keep = set(modifier.labels) if modifier is not None else set()
        out: Vector = {}
        for labels, value in inner.items():
            key = frozenset((k, v) for k, v in labels if k in keep)
            out[key] = out.get(key, 0.0) + value
        return out
    if isinstance(node, pq.BinaryExpr):
        return _binary(node, series)
    raise NotImplementedError(f"{type(node).__name__}: {node}")


def _binary(node, series: list[Series]) -> Vector | float:
    op = str(node.op)
    modifier = node.modifier  # set operators always carry one (many to many)
    if modifier is not None and (modifier.matching is not None or modifier.return_bool):
        raise NotImplementedError(f"on(), ignoring() or bool in {node}")
    lhs, rhs = _eval(node.lhs, series), _eval(node.rhs, series)
    if op in ("or", "and", "unless"):
        if not (isinstance(lhs, dict) and isinstance(rhs, dict)):
            raise TypeError(f"{op} takes two vectors")
        left, right = {_bare(k) for k in lhs}, {_bare(k) for k in rhs}
        if op == "or":
            return lhs | {k: v for k, v in rhs.items() if _bare(k) not in left}
        if op == "and":
            return {k: v for k, v in lhs.items() if _bare(k) in right}
        return {k: v for k, v in lhs.items() if _bare(k) not in right}
    apply = ARITHMETIC.get(op)
    compare = COMPARISON.get(op)
    if apply is None and compare is None:
        raise NotImplementedError(f"operator {op}")
    if not isinstance(lhs, dict) and not isinstance(rhs, dict):
        if compare is not None:
            raise NotImplementedError("a comparison of two numbers needs bool")
        return apply(lhs, rhs)
    if compare is not None:  # a filter: keeps the vector side's elements that pass
        if isinstance(lhs, dict) and isinstance(rhs, dict):
            right = {_bare(k): v for k, v in rhs.items()}
            return {k: v for k, v in lhs.items()
                    if _bare(k) in right and compare(v, right[_bare(k)])}
        if isinstance(lhs, dict):
            return {k: v for k, v in lhs.items() if compare(v, rhs)}
        return {k: v for k, v in rhs.items() if compare(lhs, v)}
    # arithmetic drops the metric's name
    if isinstance(lhs, dict) and isinstance(rhs, dict):  # one to one, on identical labels
        right = {_bare(k): v for k, v in rhs.items()}
        return {_bare(k): apply(v, right[_bare(k)]) for k, v in lhs.items() if _bare(k) in right}
    if isinstance(lhs, dict):
        return {_bare(k): apply(v, rhs) for k, v in lhs.items()}
    return {_bare(k): apply(lhs, v) for k, v in rhs.items()}
