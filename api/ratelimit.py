"""Per-key token buckets: ``N/second|minute|hour`` refilled continuously, ``burst`` tokens at most."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

from indexer.errors import RateLimitedError, SleuthError

_PERIODS = {"second": 1.0, "s": 1.0, "minute": 60.0, "min": 60.0, "m": 60.0, "hour": 3600.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float
    text: str


def parse_rate(text: str, burst: int | None = None) -> Rate:
    """``"120/minute"`` -> 2 tokens a second, bucket of 120 (or ``burst``); ``"0/minute"`` is refused."""
    m = _RATE.match(text.lower())
    if not m or m.group(2) not in _PERIODS or int(m.group(1)) <= 0:
        raise SleuthError(
            f"rate limit {text!r} must look like 120/minute (N/second, N/minute or N/hour, N > 0)"
        )
    n, period = int(m.group(1)), _PERIODS[m.group(2)]
    return Rate(per_second=n / period, burst=float(burst or n), text=text)


class RateLimiter:
    """Thread-safe token buckets keyed by API key id (or any other key: a client address). Full buckets are
    forgotten, so the table holds only recently active keys."""

    MAX_BUCKETS = 100_000

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def hit(self, key_id: Hashable, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``key_id``; ``RateLimitedError`` when the bucket is empty. Returns tokens left.

        A cost above the bucket size is charged as a full bucket (it is allowed once the bucket is full)."""
        cost = min(float(cost), self.rate.burst)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.rate.burst, now))
            tokens = min(self.rate.burst, tokens + (now - last) * self.rate.per_second)
            if tokens < cost:
                self._buckets[key_id] = (tokens, now)
                wait = math.ceil((cost - tokens) / self.rate.per_second)
                raise RateLimitedError(
                    f"rate limit of {self.rate.text} exceeded; retry in {wait} s",
                    retry_after=wait,
                )
            if len(self._buckets) >= self.MAX_BUCKETS:
                self._forget_full(now)
            self._buckets[key_id] = (tokens - cost, now)
            return tokens - cost

    def _forget_full(self, now: float) -> None:
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate.per_second >= self.rate.burst:
                del self._buckets[key]
