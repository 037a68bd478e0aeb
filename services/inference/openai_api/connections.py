"""uvicorn's h11 protocol with a request-head deadline and a connection table that closes waiting
connections first, so slow-header, idle and half-open connections cannot take the HTTP API down.

uvicorn has no header timeout: its keep-alive timer starts only after a response, so a connection that
opens and sends nothing (or one header byte at a time) stays forever, and its ``limit_concurrency``
counts such connections, so a few hundred of them made every request — /health included — a 503. Here:

* a connection must deliver a complete request head within ``http_header_timeout_s`` of opening or of
  its previous response, else it is closed (``http_keepalive_timeout_s`` still closes idle keep-alive
  connections sooner);
* the ``ConnectionTable`` keeps at most ``http_max_connections`` open: a new connection closes the one
  that has waited longest without a request in progress, and a client address holding more than
  ``http_max_waiting_connections_per_client`` waiting connections loses its own oldest. A caller that
  sends its request at once is served however many connections a flood holds open; only when every
  connection has a request in progress is a new one refused (a 503 on the spot).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

from loraflow.security.limits import ServerLimits
from loraflow.server.server_concurrency import ConnectionTable

log = logging.getLogger(__name__)

_REFUSED_BODY = b'{"error":{"message":"every connection is busy; retry later","type":"service_unavailable_error"}}'
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY))


class BoundedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection (see module docstring); ``table`` and ``limits`` are set by protocol_class."""

    table: ConnectionTable
    limits: ServerLimits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._registered = self.table.opened(self, self.client[0] if self.client else "?")
        if not self._registered:
            log.warning("HTTP connection from %s refused: all %d connections have a request in progress",
                        self.client[0] if self.client else "?", self.table.max_connections)
            transport.write(_REFUSED)
            transport.close()
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._registered:
            self.table.closed(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and self.cycle is not None and not self.transport.is_closing():
            self._cancel_deadline()  # a complete request head arrived
            self.table.busy(self)

    def on_response_complete(self) -> None:
        # First: super() may parse a pipelined request at once, which makes the connection busy again.
        if not self.transport.is_closing():
            self.table.waiting_again(self)
            self._await_head()
        super().on_response_complete()

    def evict(self) -> None:
        """ConnectionTable: close to make room (this connection had no request in progress)."""
        self._cancel_deadline()
        if not self.transport.is_closing():
            self.transport.close()

    def fileno(self) -> int:
        """ConnectionTable: the socket, to see whether bytes of a request wait unread in the kernel."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return sock.fileno() if sock is not None else -1

    def _await_head(self) -> None:
        self._cancel_deadline()
        self._head_deadline = self.loop.call_later(self.limits.http_header_timeout_s, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            log.info("HTTP connection from %s closed: no complete request head within %gs (--http-header-timeout-s)",
                     self.client[0] if self.client else "?", self.limits.http_header_timeout_s)
            self.transport.close()


def protocol_class(table: ConnectionTable, limits: ServerLimits) -> type[BoundedH11Protocol]:
    """A BoundedH11Protocol bound to one listener's table and limits (uvicorn builds one per connection)."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"table": table, "limits": limits})
