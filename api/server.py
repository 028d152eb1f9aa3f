"""The HTTP protocol of `bindpolicy serve`: httptools' parser on the event loop, straight to the pool.

uvicorn runs the workers (`api/supervisor.py`: its supervisor, its server loop, its lifespan and
graceful stop), but each connection is this protocol, not uvicorn's: the request is parsed by
httptools (llhttp, in C) on the event loop, its body gathered there with the byte limit however
it is framed, and only a complete request goes to a thread of the front's pool (api/front.py),
which runs the Flask app, writes the whole answer's bytes and hands them back with one wake-up
of the loop. uvicorn's own protocol built an ASGI scope, ran a task and a coroutine per request
(the front's), and carried the answer through two `send` messages: about a fifth of a logged
decision's CPU on the loop's thread (README, "The service"). No slow client holds a thread.

What it keeps, so that every answer the service gives is JSON:

- a request the parser refuses (a broken request line, Content-Length together with chunked
  framing, a bad chunk size...) is a JSON 400 naming what the parser said, never a text page;
- a request line and headers larger than BINDPOLICY_MAX_HEADER_BYTES (32 KiB) are a JSON 431,
  read no further;
- a request line and headers not in within BINDPOLICY_HEADER_TIMEOUT seconds (a connection
  that sends nothing counts too) are a JSON 408;
- a body not in within BINDPOLICY_BODY_TIMEOUT seconds of its headers is a JSON 408 too. One
  timer per request keeps both deadlines: armed as the request begins, moved on only if the
  body is still coming when it fires, ended when the request is in.

Each of these closes the connection (the stream cannot be trusted past them), once the requests
before it on the connection are answered. Keep-alive (closed after 5 idle seconds), pipelined
requests (answered in order, one at a time), `Expect: 100-continue`, HTTP/1.0 (closed after
its answer), HEAD (no body written) and a graceful stop (uvicorn's: each connection closes once
its answers are written) are kept as uvicorn's protocol had them.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

import httptools

from api.front import Answer, BufferedFront, Request, error_body

MAX_HEADER_BYTES = int(os.environ.get("BINDPOLICY_MAX_HEADER_BYTES", str(32 * 1024)))
HEADER_TIMEOUT = float(os.environ.get("BINDPOLICY_HEADER_TIMEOUT", "10"))
BODY_TIMEOUT = float(os.environ.get("BINDPOLICY_BODY_TIMEOUT", "10"))
PIPELINE_DEPTH = 16  # complete requests queued on one connection before it is read no further

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def json_error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the service's error body."""
    body = error_body(code, message)
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
                     b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])


def _front_of(app: Any) -> BufferedFront:
    """The front behind uvicorn's wrappers of the configured app (each keeps the next as `.app`)."""
    while not isinstance(app, BufferedFront):
        inner = getattr(app, "app", None)
        if inner is None:
            raise TypeError(f"api.server's protocol serves api.front.BufferedFront, not {type(app).__name__}")
        app = inner
    return app


class JsonHttpProtocol(asyncio.Protocol):
    """One connection: requests parsed on the loop, answered by the front's pool, in order."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any] | None = None,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.front = _front_of(config.loaded_app)
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state  # uvicorn's: connections (for a graceful stop), default headers
        self.keep_alive_timeout = float(config.timeout_keep_alive)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # (answer what came before a close)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] = ("127.0.0.1", 80)
        self.client: tuple[str, int] = ("", 0)
        # the connection
        self.waiting: deque[Request | bytes] = deque()  # complete requests (or a last refusal) not yet started
        self.busy = False  # a request of this connection is in the pool
        self.closing = False  # close once what is waiting is answered (a stop, a refusal, Connection: close)
        self.refused = False  # the parser is fed no more
        self.paused: set[str] = set()  # why reading is paused: "pipeline", "writing"
        self.idle_timer: asyncio.TimerHandle | None = None  # keep-alive, between requests
        self.head_timer: asyncio.TimerHandle | None = None  # the head's deadline, then the body's
        # the request being parsed
        self.in_head = True
        self.head_bytes = 0
        self.body_due: float | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.request: Request | None = None  # once its head is in
        self.expect_continue = False

    # --- the connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        server, client = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if isinstance(server, tuple):
            self.server = (str(server[0]), int(server[1]))
        if isinstance(client, tuple):
            self.client = (str(client[0]), int(client[1]))
        self._arm_head_timer()  # a connection that sends nothing is timed out too

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._disarm(idle=True)
        self._disarm_head_timer()
        self.waiting.clear()
        self.closing = self.refused = True

    def eof_received(self) -> bool:
        # The client will send no more; what it sent is still answered, then the connection closes.
        self.closing = True
        if not self.busy and not self.waiting:
            self.transport.close()
        return True

    def shutdown(self) -> None:
        """uvicorn's graceful stop: close now if idle, else once the answers under way are written."""
        self.closing = True
        if not self.busy and not self.waiting:
            self.transport.close()

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._disarm(idle=True)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrade is offered: the request is answered as plain HTTP
        except httptools.HttpParserError as exc:
            self.refuse(400, "bad_request", f"the HTTP request cannot be parsed: {exc}")
            return
        if self.in_head and not self.refused:  # counted once parsed: the parser says where a head starts
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEADER_BYTES:
                self._too_large()

    # --- the parser's callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head, self.body_due, self.request = True, None, None
        self.url, self.headers, self.body, self.body_size = b"", [], [], 0
        self.expect_continue = False
        if self.head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.refused:  # (the rest of a read that held a refused request)
            return
        # The timer runs on: the body is due BODY_TIMEOUT seconds from now (on_message_complete
        # ends it; if it fires first, _head_timed_out moves it to the body's deadline).
        self.in_head, self.head_bytes = False, 0
        self.body_due = self.loop.time() + BODY_TIMEOUT
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEADER_BYTES:
            self._too_large()
            return
        parser = self.parser
        version = parser.get_http_version()
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self.refuse(400, "bad_request", "the HTTP request cannot be parsed: invalid URL")
            return
        self.request = Request(
            method=parser.get_method().decode("ascii"), path=url.path, query=url.query or b"",
            version=version, headers=self.headers, server=self.server, client=self.client,
            keep_alive=version != "1.0" and parser.should_keep_alive(),
            default_headers=self.server_state.default_headers)
        for name, value in self.headers:
            if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
        if self.expect_continue and not self.busy and not self.waiting:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request is None or request.over or self.refused:
            return  # (past the limit: answered already, the rest is read and dropped)
        self.body_size += len(body)
        if self.body_size > self.front.max_body:
            request.over, self.body = True, []  # the app answers 413 now, and logs the refusal
            self._dispatch(request)
            return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._disarm_head_timer()
        self.body_due = None
        request, self.request = self.request, None
        if request is None or request.over or self.refused:
            return
        request.body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self._dispatch(request)

    # --- requests in, answers out --------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        if self.busy or self.waiting:  # pipelined: answered in order
            self.waiting.append(request)
            if len(self.waiting) >= PIPELINE_DEPTH:
                self._pause("pipeline")
            return
        self._start(request)

    def _start(self, request: Request) -> None:
        self.busy = True
        self.front.serve(request, self.loop, self._answered)

    def _answered(self, answer: Answer) -> None:
        """On the loop, from the pool: write the answer, then the next request's turn."""
        self.busy = False
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        data, keep_alive = answer
        self.transport.write(data)
        if not keep_alive or (self.closing and not self.waiting):
            self.transport.close()
            return
        if self.expect_continue:  # the request being read waited behind this answer
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.expect_continue = False
        if self.waiting:
            self._resume("pipeline")
            following = self.waiting.popleft()
            if isinstance(following, bytes):  # a refusal after the requests before it
                self.transport.write(following)
                self.transport.close()
                return
            self._start(following)
        elif self.head_timer is None:  # nothing coming in either: idle until the keep-alive ends
            self.idle_timer = self.loop.call_later(self.keep_alive_timeout, self._idle_too_long)

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer the error in JSON and close, once the requests before it are answered."""
        self._disarm_head_timer()
        self.refused = self.closing = True
        self.request = None
        if self.transport.is_closing():
            return
        self._pause("refused")
        answer = json_error_response(status, code, message)
        if self.busy or self.waiting:
            self.waiting.append(answer)
            return
        self.transport.write(answer)
        self.transport.close()

    def _too_large(self) -> None:
        self.refuse(431, "header_too_large",
                    f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")

    # --- timers and flow -----------------------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def _idle_too_long(self) -> None:
        self.idle_timer = None
        if not self.busy and not self.waiting:
            self.transport.close()

    def _disarm(self, *, idle: bool) -> None:
        if idle and self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self.head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.in_head:
            if self.busy or self.waiting:  # (a request is being answered: its own time does not count)
                self._arm_head_timer()
                return
            self.refuse(408, "request_timeout",
                        f"the request line and headers did not arrive within {HEADER_TIMEOUT:g} seconds")
            return
        if self.body_due is None:  # (the request is in)
            return
        left = self.body_due - self.loop.time()
        if left > 0:  # the head came in time: the body has until its own deadline
            self.head_timer = self.loop.call_later(left, self._head_timed_out)
        elif self.request is not None and self.request.over:  # answered 413 already: only close
            self.refused = self.closing = True
            if not self.busy and not self.waiting:
                self.transport.close()
        else:
            self.refuse(408, "request_timeout", f"the body did not arrive within {BODY_TIMEOUT:g} seconds")
