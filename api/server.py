"""The HTTP protocol of `bindpolicy serve`: httptools' parser on the event loop, straight to the pool.

uvicorn runs the workers (`api/supervisor.py`: its supervisor, its server loop, its lifespan and
graceful stop), but each connection is this protocol, not uvicorn's: the request is parsed by
httptools (llhttp, in C) on the event loop, its body gathered there with the byte limit however
it is framed, and only a complete request goes to a thread of the front's pool (api/front.py),
which runs the Flask app and makes the whole answer's bytes. uvicorn's own protocol built an
ASGI scope, ran a task and a coroutine per request (the front's), and carried the answer through
two `send` messages. No slow client holds a thread.

The pool thread writes the answer itself, on its own duplicate of the connection's socket
(`os.write` lets other threads run during the system call; uvloop's `transport.write` held the
interpreter's lock through it, 17% of a worker's GIL time in py-spy's profile), when it may:
the connection is kept alive, nothing is waiting behind the answer, and the transport's buffer
is empty. Otherwise (pipelined requests, a close, a partial write) it hands the answer to the
loop, as before. While a request is in the pool, the loop writes nothing on its connection, so
the two never interleave; a lock per connection orders who answers next.

The deadlines need no timer per request either: one timer per connection, moved on only when it
fires, checks whichever deadline the connection is under (its head, its body, its keep-alive);
a request that begins or a head that ends pulls it earlier when its own deadline is sooner.

What it keeps, so that every answer the service gives is JSON:

- a request the parser refuses (a broken request line, Content-Length together with chunked
  framing, a bad chunk size...) is a JSON 400 naming what the parser said, never a text page;
- a request line and headers larger than BINDPOLICY_MAX_HEADER_BYTES (32 KiB) are a JSON 431,
  read no further;
- a request line and headers not in within BINDPOLICY_HEADER_TIMEOUT seconds (a connection
  that sends nothing counts too) are a JSON 408;
- a body not in within BINDPOLICY_BODY_TIMEOUT seconds of its headers is a JSON 408 too.

Each of these closes the connection (the stream cannot be trusted past them), once the requests
before it on the connection are answered. Keep-alive (closed after 5 idle seconds), pipelined
requests (answered in order, one at a time), `Expect: 100-continue`, HTTP/1.0 (closed after
its answer), HEAD (no body written) and a graceful stop (uvicorn's: each connection closes once
its answers are written) are kept as uvicorn's protocol had them.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections import deque
from typing import Any

import httptools
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from api.front import Answer, BufferedFront, Request, error_body

MAX_HEADER_BYTES = int(os.environ.get("BINDPOLICY_MAX_HEADER_BYTES", str(32 * 1024)))
HEADER_TIMEOUT = float(os.environ.get("BINDPOLICY_HEADER_TIMEOUT", "10"))
BODY_TIMEOUT = float(os.environ.get("BINDPOLICY_BODY_TIMEOUT", "10"))
PIPELINE_DEPTH = 16  # complete requests queued on one connection before it is read no further
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def json_error_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, with the service's error body."""
    body = error_body(code, message)
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
                     b"content-type: application/json\r\n",
                     b"content-length: %d\r\n" % len(body),
                     b"connection: close\r\n\r\n", body])


def _forwarded(headers: list[tuple[bytes, bytes]], client: tuple[str, int],
               trusted: Any) -> tuple[tuple[str, int], str]:
    """(client, scheme) of a request from a trusted proxy, by ProxyHeadersMiddleware's rules: the
    scheme its X-Forwarded-Proto names (http or https), the client the first host from the right
    of X-Forwarded-For that is not a trusted proxy."""
    scheme, forwarded_for = "http", []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-forwarded-proto":
            proto = value.decode("latin1").strip()
            if proto in ("http", "https"):
                scheme = proto
        elif lowered == b"x-forwarded-for":
            forwarded_for.append(value)
    if forwarded_for:
        host, port = trusted.get_trusted_client_address(b", ".join(forwarded_for).decode("latin1"))
        if host:
            client = (host, port)
    return client, scheme


def _front_of(app: Any) -> tuple[BufferedFront, Any]:
    """The front behind uvicorn's wrappers of the configured app (each keeps the next as `.app`),
    and the proxies uvicorn trusts for X-Forwarded-For and -Proto (its ProxyHeadersMiddleware's,
    one of those wrappers where proxy_headers is on: FORWARDED_ALLOW_IPS), or None."""
    trusted = None
    while not isinstance(app, BufferedFront):
        if isinstance(app, ProxyHeadersMiddleware):
            trusted = app.trusted_hosts
        inner = getattr(app, "app", None)
        if inner is None:
            raise TypeError(f"api.server's protocol serves api.front.BufferedFront, not {type(app).__name__}")
        app = inner
    return app, trusted


class JsonHttpProtocol(asyncio.Protocol):
    """One connection: requests parsed on the loop, answered by the front's pool, in order."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any] | None = None,
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()
        self.front, self.trusted = _front_of(config.loaded_app)  # trusted None: X-Forwarded-* are not read
        self.loop = _loop or asyncio.get_event_loop()
        self.server_state = server_state  # uvicorn's: connections (for a graceful stop), default headers
        self.keep_alive_timeout = float(config.timeout_keep_alive)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # (answer what came before a close)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int] = ("127.0.0.1", 80)
        self.client: tuple[str, int] = ("", 0)
        # the connection; what the pool's thread reads or writes is under the lock
        self.lock = threading.Lock()
        self.fd = -1  # the pool's own duplicate of the socket (-1: answers go through the loop)
        self.lost = False
        self.waiting: deque[Request | bytes] = deque()  # complete requests (or a last refusal) not yet started
        self.busy = False  # a request of this connection is in the pool
        self.closing = False  # close once what is waiting is answered (a stop, a refusal, Connection: close)
        self.expect_continue = False  # a request being read waits for "100 Continue" behind an answer
        self.idle_since = time.monotonic()  # the last answer's time
        self.refused = False  # the parser is fed no more
        self.paused: set[str] = set()  # why reading is paused: "pipeline", "writing", "refused"
        self.timer: asyncio.TimerHandle | None = None  # the connection's one timer (see _check_time)
        self.timer_at = math.inf
        # the request being parsed
        self.in_head = True
        self.head_started = 0.0
        self.head_bytes = 0
        self.head_began = False  # the head being read began within the read being parsed
        self.body_due: float | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.request: Request | None = None  # once its head is in

    # --- the connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        server, client = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if isinstance(server, tuple):
            self.server = (str(server[0]), int(server[1]))
        if isinstance(client, tuple):
            self.client = (str(client[0]), int(client[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None and transport.get_extra_info("sslcontext") is None:
            try:
                self.fd = os.dup(sock.fileno())
            except OSError:  # (out of descriptors: this connection's answers go through the loop)
                self.fd = -1
        self.head_started = time.monotonic()  # a connection that sends nothing is timed out too
        self._arm(self.head_started + HEADER_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.closing = self.refused = True
        with self.lock:
            self.lost = True
            self.waiting.clear()
            if not self.busy:
                self._close_fd()

    def eof_received(self) -> bool:
        # The client will send no more; what it sent is still answered, then the connection closes
        # (a request whose body is not all in is not waited for: the rest will never come).
        self.request = None
        self.shutdown()
        return True

    def shutdown(self) -> None:
        """uvicorn's graceful stop: close now if idle, else once the answers under way are written."""
        self.closing = True
        with self.lock:
            idle = not self.busy and not self.waiting
        if idle and self.request is None:  # (a request whose head is in is read, and answered, first)
            self.transport.close()

    def pause_writing(self) -> None:
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self.head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # No protocol upgrade is offered: the request was answered as plain HTTP, and what
            # follows it is read as HTTP by a new parser (httptools' would read no more of it).
            self.parser = httptools.HttpRequestParser(self)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
            rest = data[upgrade.args[0]:] if upgrade.args else b""
            if rest and not self.refused:
                self.data_received(rest)
            return
        except httptools.HttpParserError as exc:
            self.refuse(400, "bad_request", f"the HTTP request cannot be parsed: {exc}")
            return
        if self.in_head and not self.refused:  # counted once parsed: the parser says where a head starts
            if self.head_began:  # (within this read, after the requests before it: only what is parsed of it)
                self.head_bytes = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            else:
                self.head_bytes += len(data)
            if self.head_bytes > MAX_HEADER_BYTES:
                self._too_large()

    # --- the parser's callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_head, self.head_began, self.body_due, self.request = True, True, None, None
        self.url, self.headers, self.body, self.body_size = b"", [], [], 0
        self.head_started = time.monotonic()
        if self.head_started + HEADER_TIMEOUT < self.timer_at:
            self._arm(self.head_started + HEADER_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.refused:  # (the rest of a read that held a refused request)
            return
        self.in_head, self.head_bytes = False, 0
        self.body_due = time.monotonic() + BODY_TIMEOUT
        if self.body_due < self.timer_at:
            self._arm(self.body_due)
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEADER_BYTES:
            self._too_large()
            return
        parser = self.parser
        if parser.should_upgrade() and any(name.lower() == b"transfer-encoding" or (
                name.lower() == b"content-length" and value.strip() != b"0") for name, value in self.headers):
            # (httptools skips the body of a request that asks to upgrade: it cannot be read)
            self.refuse(400, "bad_request", "the HTTP request cannot be parsed: a body with Upgrade "
                        "(no protocol upgrade is offered: send the request without Upgrade)")
            return
        version = parser.get_http_version()
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self.refuse(400, "bad_request", "the HTTP request cannot be parsed: invalid URL")
            return
        client, scheme = self.client, "http"
        if self.trusted is not None and client[0] in self.trusted:
            client, scheme = _forwarded(self.headers, client, self.trusted)
        self.request = Request(
            method=parser.get_method().decode("ascii"), path=url.path, query=url.query or b"",
            version=version, headers=self.headers, server=self.server, client=client,
            keep_alive=version != "1.0" and parser.should_keep_alive(),
            default_headers=self.server_state.default_headers, scheme=scheme)
        for name, value in self.headers:
            if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
                if parser.get_method() != b"HEAD" and self._declared_over():
                    # refused from its head (the app answers 413 and logs it): no "100 Continue"
                    # asks for a body that would be read only to be dropped
                    self.request.over = True
                    self._dispatch(self.request)
                    return
                with self.lock:
                    if self.busy or self.waiting:  # written once the answers before it are
                        self.expect_continue = True
                        return
                self.transport.write(CONTINUE)

    def _declared_over(self) -> bool:
        """Whether the request's Content-Length is over the body limit."""
        return any(len(name) == 14 and name.lower() == b"content-length" and value.strip().isdigit()
                   and int(value) > self.front.max_body for name, value in self.headers)

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
        self.body_due = None
        request, self.request = self.request, None
        if request is None or request.over or self.refused:
            return
        request.body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []
        self._dispatch(request)

    # --- requests in, answers out --------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        with self.lock:
            if self.busy or self.waiting:  # pipelined: answered in order
                self.waiting.append(request)
                if len(self.waiting) >= PIPELINE_DEPTH:
                    self._pause("pipeline")
                return
            self.busy = True
        self.front.serve(request, self._answer_from_pool)

    def _answer_from_pool(self, answer: Answer) -> None:
        """In the pool's thread: write the answer on the socket when nothing else may (see the
        module's docstring); else hand it to the loop."""
        data, keep_alive = answer
        with self.lock:
            if self.lost:
                self.busy = False
                self._close_fd()
                return
            if (keep_alive and self.fd >= 0 and not self.waiting and not self.closing and not self.expect_continue
                    and not self.transport.get_write_buffer_size()):
                try:
                    sent = os.write(self.fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:  # (the connection broke: the loop hears of it and closes)
                    self.busy = False
                    return
                if sent == len(data):
                    self.busy = False
                    self.idle_since = time.monotonic()
                    self.server_state.total_requests += 1
                    return
                data = data[sent:]
        self.loop.call_soon_threadsafe(self._answered, data, keep_alive)

    def _answered(self, data: bytes, keep_alive: bool) -> None:
        """On the loop: write (the rest of) an answer, then the next request's turn."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            with self.lock:
                self.busy = False
                if self.lost:
                    self._close_fd()
            return
        self.transport.write(data)
        if not keep_alive:
            self.closing = True
        with self.lock:
            following = self.waiting.popleft() if self.waiting and not (self.closing and not keep_alive) else None
            if following is None:
                self.busy, self.idle_since = False, time.monotonic()
                if self.closing:
                    self.transport.close()
                    return
            if self.expect_continue:  # the request being read waited behind this answer
                self.transport.write(CONTINUE)
                self.expect_continue = False
        if following is None:
            return
        if len(self.waiting) < PIPELINE_DEPTH:  # (resumed at once, each answer let one more read in: unbounded)
            self._resume("pipeline")
        if isinstance(following, bytes):  # a refusal after the requests before it
            with self.lock:
                self.busy = False  # (so that connection_lost closes the pool's duplicate: else no FIN)
            self.transport.write(following)
            self.transport.close()
            return
        self.front.serve(following, self._answer_from_pool)

    def refuse(self, status: int, code: str, message: str) -> None:
        """Answer the error in JSON and close, once the requests before it are answered."""
        self.refused = self.closing = True
        self.request = None
        if self.transport.is_closing():
            return
        self._pause("refused")
        answer = json_error_response(status, code, message)
        with self.lock:
            if self.busy or self.waiting:
                self.waiting.append(answer)
                return
        self.transport.write(answer)
        self.transport.close()

    def _too_large(self) -> None:
        self.refuse(431, "header_too_large",
                    f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")

    def _close_fd(self) -> None:
        """(Under the lock.) The pool's duplicate closed: the socket closes with the transport's."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- the timer and flow ---------------------------------------------------------------------
    def _pause(self, reason: str) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.paused:
            self.paused.discard(reason)
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    def _arm(self, at: float) -> None:
        """The timer set to fire at `at` (time.monotonic()), at the latest one keep-alive from now."""
        if self.timer is not None:
            self.timer.cancel()
        now = time.monotonic()
        self.timer_at = min(at, now + self.keep_alive_timeout)
        self.timer = self.loop.call_later(max(0.0, self.timer_at - now), self._check_time)

    def _check_time(self) -> None:
        """The deadline the connection is under, checked: a head or body too slow is refused (408),
        an idle connection past its keep-alive closed; else the timer is set for the next one."""
        self.timer, self.timer_at = None, math.inf
        if self.transport.is_closing():
            return
        now = time.monotonic()
        with self.lock:
            answering, idle_since = self.busy or bool(self.waiting), self.idle_since
        if self.body_due is not None:  # a body coming (a request past the limit is answered already)
            if now < self.body_due:
                self._arm(self.body_due)
            elif self.request is not None and self.request.over:
                self.refused, self.request = True, None
                self.shutdown()
            else:
                self.refuse(408, "request_timeout", f"the body did not arrive within {BODY_TIMEOUT:g} seconds")
        elif answering:  # (its own time does not count against a request being read behind it)
            self._arm(now + self.keep_alive_timeout)
        elif self.in_head:
            if now < self.head_started + HEADER_TIMEOUT:
                self._arm(self.head_started + HEADER_TIMEOUT)
            else:
                self.refuse(408, "request_timeout",
                            f"the request line and headers did not arrive within {HEADER_TIMEOUT:g} seconds")
        elif now < idle_since + self.keep_alive_timeout:
            self._arm(idle_since + self.keep_alive_timeout)
        else:  # kept alive, and idle for too long
            self.transport.close()
