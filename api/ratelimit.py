"""Per-key token buckets: ``N/second|minute|hour`` refilled continuously, ``burst`` tokens at most."""

from __future__ import annotations

import math
import re
import threading
import time
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
    """Thread-safe token buckets keyed by API key id."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def hit(self, key_id: int, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``key_id``; ``RateLimitedError`` when the bucket is empty. Returns tokens left."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.rate.burst, now))
            tokens = min(self.rate.burst, tokens + (now - last) * self.rate.per_second)
            if tokens < cost:
                self._buckets[key_id] = (tokens, now)
                wait = math.ceil((cost - tokens) / self.rate.per_second)
                raise RateLimitedError(
                    f"rate limit of {self.rate.text} exceeded for this API key; retry in {wait} s",
                    retry_after=wait,
                )
            self._buckets[key_id] = (tokens - cost, now)
            return tokens - cost
