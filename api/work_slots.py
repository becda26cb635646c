"""A bounded number of images being decoded and searched at once, with a bounded queue in front.

Decode and inference are what cost memory and CPU per request; ``WorkSlots.take`` admits ``slots`` of them at a
time and lets at most ``queue`` more wait (each holding only its upload's bytes, at most ``queue_wait_s``). Past
that the request is refused at once with ``ServerBusyError`` (503 + ``Retry-After``), so a burst of large
uploads can neither exhaust memory nor wait unboundedly. Lives on the event loop: waiting costs no thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from indexer.errors import ServerBusyError

RETRY_AFTER_S = 2.0


class WorkSlots:
    def __init__(self, slots: int, queue: int, queue_wait_s: float) -> None:
        self.slots, self.queue, self.queue_wait_s = max(1, slots), max(0, queue), queue_wait_s
        self._semaphore = asyncio.Semaphore(self.slots)
        self.admitted = 0  # working + waiting

    @property
    def in_use(self) -> int:
        return min(self.admitted, self.slots)

    @asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block (waiting in the queue first when all are taken)."""
        if self.admitted >= self.slots + self.queue:
            raise ServerBusyError(
                f"the server is busy: {self.slots} image(s) are being worked on and {self.queue} wait; "
                f"retry in {RETRY_AFTER_S:g} s", retry_after=RETRY_AFTER_S,
            )  # fmt: skip
        self.admitted += 1
        try:
            try:
                await asyncio.wait_for(self._semaphore.acquire(), timeout=self.queue_wait_s)
            except TimeoutError:
                raise ServerBusyError(
                    f"the server is busy: no work slot came free within {self.queue_wait_s:g} s; retry later",
                    retry_after=RETRY_AFTER_S,
                ) from None
            try:
                yield
            finally:
                self._semaphore.release()
        finally:
            self.admitted -= 1
