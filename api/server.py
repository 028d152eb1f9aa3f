"""The HTTP protocol of `bindpolicy serve`: uvicorn's httptools protocol, answering its own errors in JSON.

uvicorn (`--http api.server:JsonHttpProtocol`) parses requests with httptools (llhttp, in C) on
the event loop; api/front.py then reads the body there too, so no Python thread waits on a
client. What this subclass adds, so that every answer the service gives is JSON:

- a request the parser refuses (a broken request line, Content-Length together with chunked
  framing, a bad chunk size...) is a JSON 400 naming what the parser said, never a text page;
- a request line and headers larger than BINDPOLICY_MAX_HEADER_BYTES (32 KiB) are a JSON 431,
  read no further;
- a request line and headers not in within BINDPOLICY_HEADER_TIMEOUT seconds (a connection
  that sends nothing counts too) are a JSON 408, and the connection is closed;
- a body not in within BINDPOLICY_BODY_TIMEOUT seconds of its headers is a JSON 408 too. One
  timer per request keeps both deadlines: armed as the request begins, moved on only if the
  body is still coming when it fires, ended when the request is in (most requests come in one
  read: the front then reads a body that is already there, with no deadline of its own to arm,
  which cost about 10 µs of the loop's CPU a request).

Each of these closes the connection (the stream cannot be trusted past them).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.front import error_body

MAX_HEADER_BYTES = int(os.environ.get("BINDPOLICY_MAX_HEADER_BYTES", str(32 * 1024)))
HEADER_TIMEOUT = float(os.environ.get("BINDPOLICY_HEADER_TIMEOUT", "10"))
BODY_TIMEOUT = float(os.environ.get("BINDPOLICY_BODY_TIMEOUT", "10"))

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def json_error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the service's error body."""
    body = error_body(code, message)
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
                     b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])


class JsonHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a cap and a deadline on the head of each request, and JSON errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # from a request's first byte until its headers are in
        self._head_bytes = 0  # bytes received while in the head
        self._head_timer: asyncio.TimerHandle | None = None  # the head's deadline, then the body's
        self._body_due: float | None = None  # (loop time) while a body is coming
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # a connection that sends nothing is timed out too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.refuse(400, "bad_request", f"the HTTP request cannot be parsed: {exc}")
            return
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrade is offered: the request is answered as plain HTTP
        if self._in_head and not self._refused:  # counted once parsed: the parser says where a head starts
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._body_due = True, None
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        # The timer runs on: the body is due BODY_TIMEOUT seconds from now (on_message_complete
        # ends it; if it fires first, _head_timed_out moves it to the body's deadline).
        self._in_head, self._head_bytes = False, 0
        self._body_due = self.loop.time() + BODY_TIMEOUT
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEADER_BYTES:
            self._too_large()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_head_timer()
        self._body_due = None
        if not self._refused:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self.refuse(400, "bad_request", msg)

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer the error in JSON and close, unless an answer is already under way."""
        self._disarm_head_timer()
        self._refused = True
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if cycle is not None and not cycle.response_complete:  # its app hears that the client is gone
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(json_error_response(status, code, message))
        self.transport.close()

    def _too_large(self) -> None:
        self.refuse(431, "header_too_large",
                    f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head:
            self.refuse(408, "request_timeout",
                        f"the request line and headers did not arrive within {HEADER_TIMEOUT:g} seconds")
            return
        if self._body_due is None:  # (the request is in)
            return
        left = self._body_due - self.loop.time()
        if left > 0:  # the head came in time: the body has until its own deadline
            self._head_timer = self.loop.call_later(left, self._head_timed_out)
        elif self.cycle is None or not self.cycle.response_started:  # (a body over the limit is answered 413 first)
            self.refuse(408, "request_timeout", f"the body did not arrive within {BODY_TIMEOUT:g} seconds")
