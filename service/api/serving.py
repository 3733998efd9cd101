"""How the API is served: uvicorn with a header-read timeout and a cap on connections.

uvicorn arms no timer on a fresh connection until its first response is sent, so a client that
opens a connection and never finishes its request headers holds it for ever (and, with enough of
them, the server's file descriptors). `HeaderTimeoutProtocol` closes a connection whose headers take
longer than `Settings.header_timeout`, for the first request and for each next one on a kept-alive
connection; `Settings.max_connections` is uvicorn's `limit_concurrency` (past it: 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    `header_timeout` seconds of connecting (or of its last response)."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._waiting_after: object = None  # the cycle answered before the head now awaited
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and self.cycle is not self._waiting_after:
            self._disarm()  # a whole request head arrived: its body and answer are not this timer's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head on this kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no answer: the client has not sent a request to answer


def server_config(app: Any, settings: Settings, *, host: str | None = None, port: int | None = None) -> Config:
    """uvicorn's config for the API under `settings`: its header timeout and connection cap."""
    protocol = type("HeaderTimeout", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout})
    return Config(
        app,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        http=protocol,
        limit_concurrency=settings.max_connections,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
