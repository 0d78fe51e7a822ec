"""A real local Ray cluster made of ``ray start`` processes (tests and benchmarks).

A head without `agent` resources and worker nodes with them. Each node is a ``ray start`` in a
session of its own, with its own temp folder, cache folder and ports, token auth on; ``stop``
kills exactly those processes (Ray's workers run in sessions of their own: found by parent).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
WORKER_ENV = {
    # what an agent daemonizes dies with it: Ray's subreaper, not its per-worker process
    # groups (an agent runs in a session of its own, which a group kill does not reach)
    "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper": "true",
    "RAY_process_group_cleanup_enabled": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    pgid: int
    temp: Path

    def alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def processes(self) -> list[int]:
        """The node's processes: its session, and what they started (Ray's workers run in
        sessions of their own)."""
        parents: dict[int, int] = {}
        groups: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents[pid], groups[pid] = int(fields[1]), int(fields[2])
        found = {pid for pid, group in groups.items() if group == self.pgid}
        grew = True
        while grew:
            more = {pid for pid, parent in parents.items() if parent in found} - found
            grew = bool(more)
            found |= more
        return sorted(found)

    def kill(self) -> None:
        """SIGKILL every process of the node (a machine lost)."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Cluster:
    root: Path
    token: str
    port: int
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {
            **env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
            **extra,
        }

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Node:
        temp = self.root / name
        temp.mkdir()
        proc = subprocess.Popen(
            [
                RAY,
                "start",
                f"--temp-dir={temp}",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                "--object-store-memory=80000000",
                f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}",
                *args,
            ],
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = proc.communicate(timeout=120)
        node = Node(name, proc.pid, temp)
        if proc.returncode != 0:
            node.kill()
            raise RuntimeError(f"ray start {name} failed:\n{out.decode()[-3000:]}")
        return node

    def start_head(self) -> None:
        self.head = self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--dashboard-port={free_port()}",
            ],
            self.env(),
        )

    def add_worker(self, name: str, agent: int = 2) -> Node:
        cache = self.root / f"{name}-cache"
        node = self._start(
            name,
            [
                f"--address={self.address}",
                "--num-cpus=1",
                f"--resources={json.dumps({'agent': agent})}",
            ],
            self.env(**WORKER_ENV, XDG_CACHE_HOME=str(cache), OPUS_TEST_NODE=name),
        )
        self.workers.append(node)
        return node

    def wait_for_agents(self, count: float, limit: float = 60) -> None:
        """Until the cluster offers ``count`` `agent` slots (a node joined or left)."""
        script = (
            "import ray,time,sys\n"
            f"ray.init(address={self.address!r}, log_to_driver=False, logging_level='ERROR')\n"
            f"end = time.time() + {limit}\n"
            f"while time.time() < end:\n"
            "    n = sum(x['Resources'].get('agent', 0) for x in ray.nodes() if x['Alive'])\n"
            f"    if n == {count}: sys.exit(0)\n"
            "    time.sleep(0.5)\n"
            "sys.exit(1)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], env=self.env(), capture_output=True)
        assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]

    def stop(self) -> None:
        nodes = [*self.workers, *([self.head] if self.head else [])]
        everything = [pid for node in nodes for pid in node.processes()]
        for node in nodes:
            try:
                os.killpg(node.pgid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        time.sleep(1)  # a grace for raylets to stop their workers, then no mercy
        for pid in everything:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
