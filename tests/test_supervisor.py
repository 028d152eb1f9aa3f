"""api/supervisor.py's sockets: one SO_REUSEPORT group per service, never another's (no server started)."""

from __future__ import annotations

import socket

import pytest

from api.supervisor import reuseport_sockets


def test_the_workers_sockets_share_one_port_and_each_accepts() -> None:
    sockets = reuseport_sockets("127.0.0.1", 0, 3, 16)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and len({sock.fileno() for sock in sockets}) == 3
        port = ports.pop()
        # Connections spread over the group: many connections reach more than one socket.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(24)]
        counts = [0] * len(sockets)
        for number, sock in enumerate(sockets):
            sock.setblocking(False)
            try:
                while True:
                    sock.accept()[0].close()
                    counts[number] += 1
            except BlockingIOError:
                pass
        assert sum(counts) == 24 and sum(1 for c in counts if c) >= 2, counts
        for client in clients:
            client.close()
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_in_use_is_refused_not_joined() -> None:
    for reuseport in (False, True):  # a plain server, or another service's group
        taken = socket.socket()
        if reuseport:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            with pytest.raises(OSError):
                reuseport_sockets("127.0.0.1", taken.getsockname()[1], 2, 16)
        finally:
            taken.close()
