"""Per-key quotas: requests per second and tokens per minute (token buckets), concurrent streams.

A request is admitted when its key has a request token, enough token budget for its prompt plus its
`max_tokens`, and a free stream slot for each of its `n` choices; otherwise `RateLimited` (429) says
which limit and after how many seconds to retry (`Retry-After`). Tokens are charged at admission for
the whole request and the unused part is refunded when it ends, so a burst of long requests cannot
overdraw the minute's budget. State is per ingress replica: with N replicas a key gets up to N times
its quota (the documented trade-off for needing no shared store on the request path).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from services.errors import InvalidRequest, RateLimited, over_token_quota
from services.guard.keys import Principal
from services.multimodal.budget import TokenRoom
from services.settings import QuotaSettings


@dataclass
class Bucket:
    """A token bucket of `capacity` refilled at `rate` per second."""

    rate: float
    capacity: float
    level: float
    at: float

    def _fill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, amount: float, now: float) -> float:
        """0 if `amount` is available now, else seconds until it is."""
        self._fill(now)
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def refund(self, amount: float, now: float) -> None:
        self._fill(now)
        self.level = min(self.capacity, self.level + amount)


def _bucket(rate: float, capacity: float, old: Bucket | None, now: float) -> Bucket:
    """A bucket for new limits: full for a new key, else at the old one's level (capped)."""
    if old is None:
        return Bucket(rate, capacity, capacity, now)
    old._fill(now)
    return Bucket(rate, capacity, min(capacity, old.level), now)


@dataclass
class _KeyState:
    requests: Bucket | None
    tokens: Bucket | None
    streams: int = 0
    limits: QuotaSettings = field(default_factory=QuotaSettings)
    charged: int = 0  # tokens charged to requests in flight: the most their refunds return


@dataclass
class Grant:
    """An admitted request's charge, to settle with `Quotas.release`: `tokens` charged in all,
    `bucketed` of them taken from the key's token bucket (none while it had no token quota: a
    key re-quoted meanwhile is refunded only what its bucket gave), `streams` slots held."""

    key: str
    tokens: int
    name: str = ""
    bucketed: int = 0
    streams: int = 1


class Quotas:
    """Admission against each key's quota (its own, or `default`)."""

    def __init__(self, default: QuotaSettings, clock=time.monotonic):
        self.default, self.clock = default, clock
        self.keys: dict[str, _KeyState] = {}

    def _state(self, who: Principal) -> _KeyState:
        limits = who.quota or self.default
        state = self.keys.get(who.ident)
        if state is None or state.limits != limits:
            now = self.clock()
            rps, tpm = limits.requests_per_s, limits.tokens_per_min
            # a key re-quoted (its file reloaded) keeps what it has spent: new buckets start
            # where the old ones were, never fuller, so an edit is no fresh burst
            state = self.keys[who.ident] = _KeyState(
                _bucket(rps, max(rps, 1.0), state.requests if state else None, now)
                if rps else None,
                _bucket(tpm / 60.0, tpm, state.tokens if state else None, now)
                if tpm else None,
                state.streams if state else 0, limits, state.charged if state else 0)
        return state

    def admit(self, who: Principal, tokens: int) -> Grant:
        """Charge one request of up to `tokens` tokens, or raise `RateLimited`."""
        state = self._state(who)
        self._check_request(who, state)
        grant = Grant(who.ident, 0, who.key)
        self.check_tokens(grant, tokens)
        self._take_request(state)
        self.charge(grant, tokens)
        return grant

    def admit_request(self, who: Principal) -> Grant:
        """The cheap checks, before the body is read: a stream slot, a request token, and a
        token bucket that is not empty (a key out of tokens would otherwise still have its
        body read and parsed: up to a second of the loop per 100 MB). Tokens are charged once
        the request is planned (`charge`)."""
        state = self._state(who)
        self._check_request(who, state)
        grant = Grant(who.ident, 0, who.key)
        self.check_tokens(grant, 1)
        self._take_request(state)
        return grant

    @staticmethod
    def _check_streams(who: Principal, state: _KeyState, streams: int) -> None:
        limit = state.limits.max_concurrent_streams
        if limit is not None and state.streams + streams > limit:
            raise RateLimited(f"key {who.key!r} has {state.streams} streams in flight (a "
                              f"choice each); {streams} more would pass its limit of "
                              f"{limit}", retry_after=1.0, code="concurrency_limit_exceeded")

    def _check_request(self, who: Principal, state: _KeyState) -> None:
        limits = state.limits
        self._check_streams(who, state, 1)
        if state.requests is not None and (wait := state.requests.wait_s(1, self.clock())) > 0:
            raise RateLimited(f"key {who.key!r} is over {limits.requests_per_s:g} requests/s",
                              retry_after=wait, code="requests_per_s_exceeded")

    @staticmethod
    def _take_request(state: _KeyState) -> None:
        if state.requests is not None:
            state.requests.take(1)
        state.streams += 1

    def take_streams(self, who: Principal, grant: Grant, n: int) -> None:
        """A request of `n` choices decodes `n` streams: the slots beyond the one its admission
        took, or `RateLimited` (the grant keeps what it holds, to `release`)."""
        state = self.keys.get(grant.key)
        if state is None or n <= grant.streams:
            return
        limit = state.limits.max_concurrent_streams
        if limit is not None and n > limit:  # never: a 429's Retry-After had clients loop
            raise InvalidRequest(f"the request asks for {n} choices, a stream each; key "
                                 f"{who.key!r} may hold {limit:g} at once, so it can never "
                                 "pass: ask for fewer", param="n",
                                 code="concurrency_limit_exceeded")
        self._check_streams(who, state, n - grant.streams)  # its request token is taken
        state.streams += n - grant.streams
        grant.streams = n

    def check_tokens(self, grant: Grant, tokens: int) -> None:
        """Raise `RateLimited` if the key could not pay `tokens` now (nothing is charged)."""
        state = self.keys.get(grant.key)
        if state is None or state.tokens is None:
            return
        wait = state.tokens.wait_s(tokens, self.clock())
        if wait > 0:
            raise over_token_quota(tokens, grant.name, state.limits.tokens_per_min, wait)

    def reserve(self, grant: Grant, most: int) -> TokenRoom | None:
        """Hold up to `most` more tokens for a request whose cost is not known yet (its images'
        tokens, read from their headers elsewhere), as much as the key has now, and the room
        that check may use (None: no token quota): what this request holds in all, never what
        other requests hold or might refund (concurrent image requests of one key would each
        see the same tokens, and each have its images decoded before the exact charge refused
        all but one). `settle` makes the charge exact once the cost is known."""
        state = self.keys.get(grant.key)
        if state is None or state.tokens is None:
            return None
        state.tokens.wait_s(0, self.clock())  # filled to now
        take = int(min(max(most, 0), max(state.tokens.level, 0.0)))
        if take:
            state.tokens.take(take)
            state.charged += take
            grant.bucketed += take
            grant.tokens += take
        return TokenRoom(grant.name, state.limits.tokens_per_min, grant.bucketed,
                         state.tokens.capacity)

    def charge(self, grant: Grant, tokens: int) -> None:
        """Charge an admitted request's `tokens`, or raise `RateLimited` (then `release` it)."""
        self.check_tokens(grant, tokens)
        state = self.keys.get(grant.key)
        if state is not None and state.tokens is not None:
            state.tokens.take(tokens)
            state.charged += tokens
            grant.bucketed += tokens
        grant.tokens += tokens

    def settle(self, grant: Grant, tokens: int) -> None:
        """The request costs `tokens` in all, now known: charge what its grant lacks (or
        raise `RateLimited`), or give back at once what it holds beyond them."""
        more = tokens - grant.tokens
        if more >= 0:
            return self.charge(grant, more)
        state = self.keys.get(grant.key)
        back = min(grant.bucketed, -more)
        grant.tokens = tokens
        if state is not None and state.tokens is not None and back > 0:
            grant.bucketed -= back
            state.charged = max(0, state.charged - back)
            state.tokens.refund(back, self.clock())

    def release(self, grant: Grant | None, used_tokens: int) -> None:
        """The request ended having used `used_tokens`: free its slot, refund the rest."""
        state = self.keys.get(grant.key) if grant is not None else None
        if state is None:
            return
        state.streams = max(0, state.streams - grant.streams)
        state.charged = max(0, state.charged - grant.bucketed)
        unused = min(grant.bucketed, grant.tokens - used_tokens)
        if state.tokens is not None and unused > 0:
            state.tokens.refund(unused, self.clock())
