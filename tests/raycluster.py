"""A Ray cluster of two nodes on this machine, started as an operator starts one: `ray start --head`,
then `ray start --address HEAD` for the second node (1 CPU each, no dashboard), as Ray's own
multi-node tests do on one machine. Every port is a free one, so that clusters of other runs on
the machine are left alone; stopping ends exactly the processes this cluster started (each
`ray start --block` leads a process group of its own, and whatever is left naming the cluster's
private temporary folder), never a `ray stop`, which would end every Ray of the machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT = 180.0  # seconds for both nodes to be up on a loaded machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """Where the kernel starts handing out ports to bind(0) (every _free_port comes from above it)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_ports_low() -> int:
    """The first of 200 worker ports for this cluster (100 per node), below the kernel's ephemeral
    range: Ray refuses to start a node whose other ports (free ones, thus ephemeral) fall in its
    worker range, and two nodes must not share one."""
    return random.randrange(10_000, max(_ephemeral_low(), 10_400) - 200, 200)


def _node_ports(worker_low: int) -> list[str]:
    """Every port a node listens on, free now; its worker ports the 100 from worker_low."""
    return ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--min-worker-port", str(worker_low), "--max-worker-port", str(worker_low + 99)]


def _reread_ray_config() -> None:
    """Make a Ray already imported in this process read its authentication settings again (Ray
    reads them from the environment once, when imported)."""
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


class RayCluster:
    """`with RayCluster() as cluster:` a head and a second node; `cluster.address` to join it."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        self.cpus = cpus_per_node
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.address = f"127.0.0.1:{_free_port()}"
        self.nodes: list[subprocess.Popen[bytes]] = []
        self.worker_ports = _worker_ports_low()
        # Ray's token authentication, with a token of this cluster's own (not the machine's
        # ~/.ray/auth_token): the nodes, and this process as the driver that joins them.
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self._saved: dict[str, str | None] = {}

    def _start(self, role: list[str]) -> None:
        common = ["--num-cpus", str(self.cpus), "--disable-usage-stats",
                  "--temp-dir", self.temp, "--object-store-memory", str(100 * 2**20), "--node-ip-address",
                  "127.0.0.1", "--block", *_node_ports(self.worker_ports + 100 * len(self.nodes))]
        log = open(Path(self.temp) / f"node{len(self.nodes)}.out", "wb")  # noqa: SIM115 (kept by the process)
        env = {**os.environ, **self.auth, "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes.append(subprocess.Popen([RAY, "start", *role, *common], stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True, env=env))

    def _alive_nodes(self) -> int:
        import ray

        return sum(1 for node in ray.nodes() if node.get("Alive"))

    def __enter__(self) -> RayCluster:
        for name, value in self.auth.items():
            self._saved[name] = os.environ.get(name)
            os.environ[name] = value
        _reread_ray_config()
        import ray

        try:
            self._start(["--head", "--include-dashboard=false", "--port", self.address.rsplit(":", 1)[1],
                         "--ray-client-server-port", str(_free_port())])
            deadline = time.monotonic() + START_TIMEOUT
            self._wait_for_head(deadline)
            self._start(["--address", self.address])
            # The driver finds its node among the raylets running on this machine (other runs'
            # too): it joins once both of this cluster's are there.
            while sum(1 for _ in self._processes(b"/raylet")) < 2:
                self._check_running(deadline)
                time.sleep(0.5)
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            while self._alive_nodes() < 2:
                self._check_running(deadline)
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_head(self, deadline: float) -> None:
        host, port = self.address.rsplit(":", 1)
        while True:
            self._check_running(deadline)
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
                return
            time.sleep(0.5)

    def _check_running(self, deadline: float) -> None:
        for number, node in enumerate(self.nodes):
            if node.poll() is not None:
                said = (Path(self.temp) / f"node{number}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray start (node {number}) exited with {node.returncode}: {said}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster was not up within {START_TIMEOUT:.0f} s")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Disconnect, then end each node's process group, then anything left that names this
        cluster's temporary folder (a process that left its group)."""
        import shutil

        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reread_ray_config()
        for node in reversed(self.nodes):  # nothing of a test cluster needs a graceful stop
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait(timeout=30)
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)

    def _processes(self, naming: bytes = b"") -> list[int]:
        """Processes whose command line names this cluster's private temporary folder (and `naming`)."""
        mine = self.temp.encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                line = (entry / "cmdline").read_bytes()
                if mine in line and naming in line.split(b"\0", 1)[0]:
                    found.append(int(entry.name))
        return found
