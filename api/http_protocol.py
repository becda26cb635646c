"""uvicorn's h11 protocol with a deadline on request headers: a connection that opens and never completes its
headers (or sends half a second request) is closed after ``header_timeout_s``, so idle or incomplete requests
cannot hold the server's connections (uvicorn only times out idle keep-alive connections between requests)."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineH11Protocol(H11Protocol):
    header_timeout_s = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request's headers get the same deadline

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _headers_overdue(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request whose headers arrived
        if waiting and not self.transport.is_closing():
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadlineH11Protocol]:
    """The protocol class (for ``uvicorn.run(http=...)``) with its deadline set to ``seconds``."""
    return type(
        "HeaderDeadlineH11Protocol", (HeaderDeadlineH11Protocol,), {"header_timeout_s": float(seconds)}
    )
