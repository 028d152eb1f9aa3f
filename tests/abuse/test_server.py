"""Attacks on the running service (issue 8, items 2, 3, 6, 8): slow clients, bodies framed to slip
past the limit, malformed HTTP, a worker killed while the files are broken. Real servers: slow."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import pytest

from engine.decisionlog import open_store

from ..conftest import bind_request
from ..test_server import TOKEN, Server, call, start_server

pytestmark = pytest.mark.slow


def raw_http(server: Server, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers and body of the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def _length(answer: bytes) -> int:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":")[1])
    return 0


@pytest.fixture
def server(tmp_path: Path) -> Server:
    running = start_server(tmp_path, env={"BINDPOLICY_BODY_TIMEOUT": "3"})
    yield running  # type: ignore[misc]
    running.stop()


def latencies(url: str, count: int, clients: int = 4) -> list[float]:
    found: list[float] = []

    def one() -> None:
        for _ in range(count // clients):
            started = time.perf_counter()
            status, _ = call(url + "/v1/decisions", bind_request(), timeout=20)
            found.append(time.perf_counter() - started if status == 200 else float("inf"))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return found


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


# Item 2: slow clients hold no thread; the others barely notice them.
def test_64_slow_clients_leave_the_others_p99_within_twice(server: Server) -> None:
    latencies(server.url, 40)  # warm up
    before = latencies(server.url, 200)
    host, port = server.url.removeprefix("http://").split(":")
    slow = []
    for _ in range(64):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        slow.append(sock)
    try:
        time.sleep(0.3)
        during = latencies(server.url, 200)
        health = call(server.url + "/healthz", timeout=2)
    finally:
        answers = []
        for sock in slow:  # after the body timeout (3 s here), each gets a JSON 408, then the connection closes
            sock.settimeout(10)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(4096):  # the head and the body may come in separate writes
                    answer += chunk
            answers.append(answer)
            sock.close()
    ratio = p99(during) / p99(before)
    print(f"\nslow clients: p99 {p99(before) * 1000:.1f} ms alone, {p99(during) * 1000:.1f} ms beside 64 slow "
          f"connections: x{ratio:.2f}")
    assert health[0] == 200 and max(during) < float("inf")
    # The goal is 2x; a shared machine adds noise, so the test allows 1 ms more before it fails.
    assert p99(during) <= 2 * p99(before) + 0.001, ratio
    assert all(a.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in a for a in answers), answers[:2]


# Item 6: however the body is framed, past the limit it is a 413.
def test_a_chunked_body_over_the_limit_is_a_413_not_cut(shared: Server) -> None:
    server = shared
    body = b'{"action": "login"}' + b" " * (1024 * 1024) + b"garbage"
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in
                      (body[i:i + 65536] for i in range(0, len(body), 65536))) + b"0\r\n\r\n"
    status, _, answer = raw_http(server, b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                       b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert status == 413 and json.loads(answer)["error"]["code"] == "payload_too_large"
    record = call(f"{server.url}/v1/decisions/{json.loads(answer)['decision_id']}", token=TOKEN)[1]["record"]
    assert record["status"] == 413


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """One server for the tests that only send a request and read its answer."""
    running = start_server(tmp_path_factory.mktemp("shared"), env={"BINDPOLICY_HEADER_TIMEOUT": "1.5",
                                                                   "BINDPOLICY_MAX_HEADER_BYTES": "8192"})
    yield running  # type: ignore[misc]
    running.stop()


# Item 8: every error is JSON, the server's own included (raw bytes on a socket, as sent).
@pytest.mark.parametrize(("request_bytes", "expected", "code"), [
    (b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "bad_request"),
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1 EXTRA\r\nHost: x\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400, "bad_request"),
    (b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400, "bad_request"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431, "header_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 2000 + b"\r\n", 431, "header_too_large"),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431, "header_too_large"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", 408, "request_timeout"),  # the head never ends
    (b"", 408, "request_timeout"),  # a connection that sends nothing
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
    (b"DELETE /v1/decisions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "method_not_allowed"),
    (b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
     415, "unsupported_media_type"),
], ids=["length-and-chunked", "request-line", "http-version", "header-name", "chunk-size", "one-header-100KB",
        "2000-headers", "20KB-url", "slow-head", "silent", "404", "405", "415"])
def test_every_error_is_json(shared: Server, request_bytes: bytes, expected: int, code: str) -> None:
    status, headers, body = raw_http(shared, request_bytes)
    assert status == expected and headers["content-type"] == "application/json", (status, headers, body[:200])
    assert json.loads(body)["error"]["code"] == code


def test_a_head_within_the_cap_is_served_and_the_connection_stays_usable(shared: Server) -> None:
    host, port = shared.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for turn in range(2):  # kept alive: the second request's head is timed and capped afresh
            if turn:
                time.sleep(2)  # longer than the head timeout: an idle kept-alive connection is not a slow head
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"a" * 6000 + b"\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")


# Item 3: broken files plus a worker killed: the port stays open and the last good set serves.
def test_a_worker_killed_while_the_files_are_broken_is_replaced_on_the_last_good_set(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        assert call(server.url + "/v1/decisions", bind_request())[0] == 200
        with open(server.policies / "v2" / "bind.yaml", "a") as broken:
            broken.write("  - id: [\n")
        time.sleep(1.0)  # the watchers refuse the change; the good set keeps serving
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
        workers = [int(p) for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(workers[0], signal.SIGKILL)
        deadline, statuses, from_archive = time.monotonic() + 30, [], False
        while time.monotonic() < deadline and not from_archive:
            try:
                statuses.append(call(server.url + "/v1/decisions", bind_request(), timeout=10)[0])
                ready = call(server.url + "/readyz")[1]
            except OSError:  # a connection the killed worker had accepted
                statuses.append(0)
                continue
            from_archive = "archive" in ready.get("policies_from", "")
            time.sleep(0.1)
        assert from_archive, "no worker said it serves the archived set"
        # Only what the killed worker held may be lost; the port stays open and the rest is decided.
        assert statuses.count(0) <= 2 and set(statuses) <= {0, 200}, statuses
        assert statuses[-1] == 200 and server.process.poll() is None
    finally:
        server.stop()
    store = open_store(f"sqlite:///{server.data / 'decisions.db'}")
    assert store.verify() is None


def read_until_closed(server: Server, data: bytes, pause: float = 0.0, rest: bytes = b"") -> bytes:
    """Send `data` (then `rest` after `pause` seconds) and read until the server closes."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        if rest:
            time.sleep(pause)
            answer += sock.recv(65536)  # (what came before the rest was sent)
            sock.sendall(rest)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# The protocol (api/server.py) hands requests to the pool past uvicorn's: HTTP as uvicorn had it.
def test_pipelined_requests_are_answered_in_order_and_connection_close_closes(shared: Server) -> None:
    body = json.dumps(bind_request()).encode()
    decision = (b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = read_until_closed(shared, decision + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + decision
                               + b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 200, 200, 404], answer[:500]
    assert answer.count(b'"decision":"allow"') == 2 and b'"code":"not_found"' in answer.rpartition(b"\r\n\r\n")[2]


def test_expect_100_continue_head_and_http_1_0(shared: Server) -> None:
    body = json.dumps(bind_request()).encode()
    answer = read_until_closed(
        shared, b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body), pause=0.5, rest=body)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), answer[:200]
    assert answer.endswith(b"}") and b'"decision":"allow"' in answer
    head = read_until_closed(shared, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 15\r\n" in head.lower()
    assert head.endswith(b"\r\n\r\n"), head  # the length a GET would get, and no body
    old = read_until_closed(shared, b"GET /healthz HTTP/1.0\r\n\r\n")  # answered, then closed
    assert old.startswith(b"HTTP/1.1 200 OK\r\n") and old.endswith(b'{"status":"ok"}'), old
    assert b"connection: close\r\n" in old.lower()


def test_expect_100_continue_with_a_body_over_the_limit_is_refused_from_its_head(shared: Server) -> None:
    host, port = shared.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(65536)):  # no body sent: answered all the same
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "payload_too_large"


def test_a_client_behind_a_local_proxy_is_the_one_x_forwarded_for_names(shared: Server) -> None:
    # Scratch copies (auto) are taken only from this machine's users: a remote client that a proxy
    # on this machine forwards is not one (FORWARDED_ALLOW_IPS, uvicorn's default 127.0.0.1 and ::1).
    def scratch(headers: bytes) -> tuple[int, bytes]:
        body = b'{"files": {}}'
        status, _, answer = raw_http(shared, b"POST /v1/scratch/check HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                             b"Content-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                                             % (headers, len(body), body))
        return status, answer

    forwarded = scratch(b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n")
    assert forwarded[0] == 403 and json.loads(forwarded[1])["error"]["code"] == "scratch_disabled", forwarded
    assert scratch(b"X-Forwarded-For: 127.0.0.1\r\n")[0] != 403  # a local client through the proxy
    assert scratch(b"")[0] != 403


def test_a_head_that_begins_late_in_a_read_is_not_counted_whole(shared: Server) -> None:
    """A read holding many pipelined requests and the start of one more: only that last head's own
    bytes count against the cap (8 KiB here), not the whole read's (which made it a 431)."""
    host, port = shared.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 400 + b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.3)
        sock.sendall(b"Host: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200] * 401, (len(statuses), answer[-300:])


def test_a_refusal_behind_an_answer_closes_the_connection(shared: Server) -> None:
    """A request the parser refuses, pipelined behind one in the pool: both answered, then the
    connection closes (the pool's duplicate of the socket held it open, and leaked, before)."""
    body = json.dumps(bind_request()).encode()
    answer = read_until_closed(shared, b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: %d\r\n\r\n%sGARBAGE\r\n\r\n" % (len(body), body))
    assert [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 400], answer[-300:]
    assert answer.endswith(b"}") and b'"code":"bad_request"' in answer.rpartition(b"\r\n\r\n")[2]


def test_a_request_asking_to_upgrade_is_answered_as_http_and_the_connection_read_on(shared: Server) -> None:
    """curl --http2 on http:// asks for h2c: no upgrade is offered, the request is answered as
    HTTP/1.1 and what follows it on the connection is read too (httptools stopped reading, before);
    a body sent with Upgrade (which httptools skips) is a 400 saying so, not an empty body decided."""
    upgrade = (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    answer = read_until_closed(shared, upgrade + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 200], answer[-300:]
    body = json.dumps(bind_request()).encode()
    status, _, refusal = raw_http(shared, b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                          b"application/json\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert status == 400 and "Upgrade" in json.loads(refusal)["error"]["message"], refusal


def test_a_request_whose_body_is_coming_at_a_graceful_stop_is_answered_and_logged(tmp_path: Path) -> None:
    """SIGTERM while a request's head is in and its body is not: it is read, answered and logged
    before the connection closes (it was closed unanswered: neither answered nor refused)."""
    server = start_server(tmp_path, workers=1)
    body = json.dumps(bind_request()).encode()
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:-5]))
            time.sleep(0.3)
            os.killpg(server.process.pid, signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[-5:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
        decision_id = json.loads(answer.partition(b"\r\n\r\n")[2])["decision_id"]
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
    store = open_store(f"sqlite:///{server.data / 'decisions.db'}")
    assert store.verify() is None and [r.decision_id for r in store.query()] == [decision_id]


def _workers_rss_kib(server: Server) -> int:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text().split()
    total = 0
    for pid in children:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_a_pipelined_flood_never_read_holds_bounded_memory(shared: Server) -> None:
    """Requests pipelined without end by a client that reads no answer: the connection is read no
    further once PIPELINE_DEPTH wait (each answer let one more read in, and the workers grew by
    ten times what was sent: 127 MB for 13 MB)."""
    host, port = shared.url.removeprefix("http://").split(":")
    before = _workers_rss_kib(shared)
    flood, sent = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 300_000, 0
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and sent < len(flood):
            try:
                sent += sock.send(flood[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.05)
        grown = _workers_rss_kib(shared) - before
    assert grown < 30_000, f"the workers grew by {grown} KiB for {sent} bytes sent"
    assert call(shared.url + "/healthz")[0] == 200
