"""The front: reads each request whole, off the Python threads, before the WSGI app sees it.

`bindpolicy serve`'s protocol (api/server.py) accepts connections and reads request lines,
headers and bodies on the event loop, with a size cap, deadlines and the byte limit however the
body is framed (Content-Length or chunked); only a complete request is handed to a thread of
the pool that runs the Flask app (`BufferedFront.serve`), which makes the whole answer's bytes
and hands them to the protocol in that thread. A slow client costs a little memory on the loop,
not a thread: sixty-four clients that send one byte a minute hold no thread that others need.
The same front is an ASGI app too (its lifespan runs under uvicorn; any ASGI server can serve
it, through the same pool).

Why not a WSGI server: each calls the app as soon as the headers are in, and the body is read
when the app asks, from the app's thread (measured with granian's WSGI interface: a slow body
holds the thread).
"""

from __future__ import annotations

import asyncio
import io
import logging
import queue
import sys
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

log = logging.getLogger("bindpolicy.front")

Scope = dict[str, Any]
Result = tuple[str, list[tuple[str, str]], bytes]  # the app's status line, headers and whole body
Answer = tuple[bytes, bool]  # an HTTP/1.1 answer's bytes, and whether the connection stays open
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message, "details": []}})


FAILED: Result = ("500 Internal Server Error", [("Content-Type", "application/json")],
                  error_body("internal_error", "the server failed to answer; the error is logged"))


def _settle(answer: asyncio.Future[Any], result: Any) -> None:
    if not answer.done():  # (cancelled if the server stopped waiting)
        answer.set_result(result)


class Request:
    """A request as the protocol read it (api/server.py), for a pool thread to make its environ."""

    __slots__ = ("body", "client", "default_headers", "headers", "keep_alive", "method", "over", "path",
                 "query", "scheme", "server", "version")

    def __init__(self, *, method: str, path: bytes, query: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 server: tuple[str, int], client: tuple[str, int], keep_alive: bool,
                 default_headers: list[tuple[bytes, bytes]], scheme: str = "http") -> None:
        self.method, self.path, self.query, self.version = method, path, query, version
        self.headers, self.server, self.client, self.scheme = headers, server, client, scheme
        self.keep_alive = keep_alive
        self.default_headers = default_headers  # the server's (uvicorn's date)
        self.body = b""
        self.over = False  # the body went past the limit: the app is told, and answers 413


NO_BODY_STATUSES = frozenset((204, 304))


def http_answer(request: Request, result: Result) -> Answer:
    """The bytes of the whole answer to `request`: its status line, the server's headers, the app's
    (its own length: the body is whole), the body unless HEAD; whether the connection stays open."""
    status, headers, body = result
    keep_alive = request.keep_alive
    lines = [b"HTTP/1.1 ", status.encode("latin1"), b"\r\n"]
    for server_name, server_value in request.default_headers:
        lines += [server_name, b": ", server_value, b"\r\n"]
    length = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            length = value
            continue
        if lowered == "transfer-encoding":
            continue
        if lowered == "connection" and "close" in value.lower():
            keep_alive = False
            continue
        lines += [name.encode("latin1"), b": ", value.encode("latin1"), b"\r\n"]
    code = int(status[:3])
    if request.method == "HEAD":  # the length of the body a GET would get, no body
        if length is not None:
            lines += [b"content-length: ", length.encode("latin1"), b"\r\n"]
        body = b""
    elif code >= 200 and code not in NO_BODY_STATUSES:
        lines += [b"content-length: %d\r\n" % len(body)]
    else:
        body = b""
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines += [b"\r\n", body]
    return b"".join(lines), keep_alive


def request_environ(request: Request, max_body: int) -> dict[str, Any]:
    """The WSGI environ of a request read by the protocol, with its whole body."""
    path = request.path
    if b"%" in path:
        path = urllib.parse.unquote_to_bytes(path)
    return _wsgi_environ(
        request.method, "", path.decode("latin1"), request.query.decode("latin1"), request.server, request.client,
        request.version, request.scheme, request.body, max_body + 1 if request.over else len(request.body),
        request.headers)


def _wsgi_environ(method: str, script_name: str, path_info: str, query: str, server: tuple[Any, Any],
                  client: tuple[Any, Any], version: str, scheme: str, body: bytes, length: int,
                  headers: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """A WSGI environ with the whole body; `length`: the one the app is told."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": script_name, "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]), "SERVER_PROTOCOL": f"HTTP/{version}",
        "REMOTE_ADDR": str(client[0]), "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0), "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
        "wsgi.multiprocess": True, "wsgi.run_once": False, "wsgi.input_terminated": True,
        # Whatever the framing, the app sees the length it was given: one over the limit, if so.
        "CONTENT_LENGTH": str(length),
        # The whole body as read, for the app to take without wrapping wsgi.input in a stream
        # (werkzeug's get_data: about 40 µs a request); wsgi.input stays for everyone else.
        "bindpolicy.body": body,
    }
    _add_headers(environ, headers)
    return environ


def _add_headers(environ: dict[str, Any], headers: Iterable[tuple[bytes, bytes]]) -> None:
    for name, value in headers:
        key = name.decode("latin1").upper().replace("-", "_")
        text = value.decode("latin1")
        if key == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = text
        elif key in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            continue
        else:
            key = f"HTTP_{key}"
            environ[key] = f"{environ[key]},{text}" if key in environ else text


class Pool:
    """Threads that run the app, fed by one queue. concurrent.futures' executor made a future (a
    condition and its locks) and a work item for every request, and took a lock to submit it:
    about 19 µs of CPU a request against 1, to carry an answer that goes back to the loop by
    call_soon_threadsafe anyway."""

    def __init__(self, threads: int, name: str = "wsgi") -> None:
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{n}", daemon=True)
                         for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], object]) -> None:
        self._queue.put(work)

    def shutdown(self) -> None:
        """Run what was submitted, then end the threads (a stop waits for the requests in flight)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                work()
            except Exception:  # (the loop closed under an answer): the thread serves on
                log.exception("a request's work failed in the pool")


class BufferedFront:
    """ASGI to WSGI, buffering: the body is read before a thread is taken."""

    def __init__(self, app: WSGIApp, *, max_body: int, threads: int,
                 on_shutdown: Callable[[], None] | None = None) -> None:
        self.app = app
        self.on_shutdown = on_shutdown  # run at a graceful stop, once requests in flight are done
        self.max_body = max_body
        self.pool = Pool(threads)

    def serve(self, request: Request, answered: Callable[[Answer], None]) -> None:
        """From the loop: run the app on `request` in a pool thread, which makes the answer's bytes and
        hands them to `answered`, in that thread (the protocol writes them from there, or wakes the loop)."""
        self.pool.submit(lambda: answered(self._answer(request)))

    def _answer(self, request: Request) -> Answer:
        try:
            return http_answer(request, self._run(request_environ(request, self.max_body)))
        except Exception:  # (a request the environ cannot hold): the last resort, as _run's
            log.exception("a request could not be handed to the application")
            request.keep_alive = False
            return http_answer(request, FAILED)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        # No deadline here: the protocol keeps the body's (api/server.py), answers 408 and closes,
        # and the read ends as if the client had gone.
        body, over = await self._read_body(receive)
        if body is None:  # the client went away
            return
        environ = self._environ(scope, body, over)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Result] = loop.create_future()
        self.pool.submit(lambda: loop.call_soon_threadsafe(_settle, answer, self._run(environ)))
        status, headers, chunks = await answer
        await send({"type": "http.response.start", "status": int(status[:3]),
                    "headers": [(k.lower().encode("latin1"), v.encode("latin1")) for k, v in headers]})
        await send({"type": "http.response.body", "body": chunks})

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, bool]:
        """The whole body, or (None, _) if the client left; past the limit, reading stops and the
        app is told the body is too large (it answers 413 and logs the refusal)."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), False

    def _environ(self, scope: Scope, body: bytes, over: bool) -> dict[str, Any]:
        return _wsgi_environ(
            scope["method"], scope.get("root_path", "").encode().decode("latin1"),
            scope["path"].encode().decode("latin1"), scope.get("query_string", b"").decode("latin1"),
            scope.get("server") or ("127.0.0.1", 80), scope.get("client") or ("", 0),
            scope.get("http_version", "1.1"), scope.get("scheme", "http"), body,
            self.max_body + 1 if over else len(body), scope.get("headers", []))

    def _run(self, environ: dict[str, Any]) -> Result:
        """Call the WSGI app in a pool thread; the answer comes back whole (bodies are small)."""
        started: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
            started["status"], started["headers"] = status, headers

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception:  # the app's own handlers answer every error; this is the last resort
            log.exception("the application failed")
            return FAILED
        return str(started["status"]), started["headers"], body

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.shutdown()  # requests in flight finish (their records commit)
                if self.on_shutdown is not None:  # (a worker process exits without running atexit)
                    self.on_shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return
