"""A real multi-node Ray cluster on 127.0.0.1, as Ray's own tests make one: `ray.cluster_utils.Cluster`,
a head and worker nodes, each with its own raylet, object store, ports and worker processes, so that one
node can be lost whole (SIGKILL of its raylet and every process it started) while the others run on.

`ray start` cannot do this here: under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (the switch that keeps Ray on
loopback) it refuses to join a cluster, and without it 127.0.0.1 is rewritten to the machine's address.
So the cluster lives in a small keeper process (`python -m tests.ray_cluster`), which the test drives over
its stdin: the pytest process keeps its own local Ray, and the keeper's nodes outlive nothing.

The head has no CPUs: drivers and Ray Train's controller run there, the work runs on the worker nodes,
the ones a test kills. The GCS health check notices a dead node in ~2 s instead of Ray's default ~30 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# GCS settings (RayConfig reads RAY_<name> at start-up): a node that stops answering is dead after 4 missed
# checks 500 ms apart.
FAST_NODE_DEATH = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment of the nodes and of drivers run against them: loopback only, no token auth, this
    venv's `python` first on PATH, the project importable."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **FAST_NODE_DEATH)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class LocalCluster:
    """`LocalCluster.start(workers=N)`. `.address` (GCS, for RAY_ADDRESS), `.dashboard` (Jobs and state API),
    `.node_ids` (name -> Ray node id; worker nodes are named worker0.. and carry a custom resource of their
    name), `.kill(name)`, `.add_worker(name)`, `.shutdown()`."""

    keeper: subprocess.Popen
    address: str
    dashboard: str
    node_ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, workers: int = 2, cpus_per_worker: int = 1, timeout: float = 180) -> LocalCluster:
        keeper = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_cluster", str(workers), str(cpus_per_worker)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ray_env(), cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        ready = _read_reply(keeper, timeout)
        return cls(keeper, ready["address"], ready["dashboard"], ready["nodes"])

    def _call(self, *command: str, timeout: float = 120) -> dict:
        self.keeper.stdin.write(" ".join(command) + "\n")
        self.keeper.stdin.flush()
        return _read_reply(self.keeper, timeout)

    def kill(self, name: str) -> None:
        """SIGKILL a worker node's raylet and every process of it, as a lost machine: nothing shuts down
        cleanly. Returns when the processes are gone (the GCS marks the node dead ~2 s later)."""
        self._call("kill", name)
        self.node_ids.pop(name)

    def add_worker(self, name: str, cpus: int = 1) -> str:
        self.node_ids[name] = self._call("add", name, str(cpus))["node_id"]
        return self.node_ids[name]

    def name_of(self, node_id: str) -> str | None:
        return next((name for name, nid in self.node_ids.items() if nid == node_id), None)

    def shutdown(self) -> None:
        try:
            self.keeper.stdin.close()
            self.keeper.wait(timeout=60)
        except Exception:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.keeper.pid, signal.SIGKILL)  # whatever is left of its process group
        self.keeper.wait()


def _read_reply(keeper: subprocess.Popen, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = keeper.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster keeper exited ({keeper.poll()})")
        if line.startswith("{"):
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply
    raise TimeoutError("the cluster keeper did not answer")


# ------------------------------------------------------------------------------------------------
# The keeper process
# ------------------------------------------------------------------------------------------------
def _agent_ports() -> dict[str, int]:
    """Ports of a node's own agents: the pytest session's local Ray holds Ray's defaults."""
    names = ("dashboard_agent_listen_port", "metrics_export_port", "runtime_env_agent_port")
    return {name: free_port() for name in names}


def _keep(workers: int, cpus: int) -> None:
    import ray
    from ray._private.utils import get_ray_address_file, write_ray_address
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # socket paths must stay under 107 bytes
    dashboard = free_port()
    # Cluster() records its address in /tmp/ray/ray_current_cluster, where a bare ray.init() anywhere on the
    # machine would find (and join) it, even after it is gone: the file is put back as it was.
    address_file = get_ray_address_file(None)
    previous = Path(address_file).read_text() if os.path.exists(address_file) else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": dashboard, "temp_dir": temp, **_agent_ports()},
    )  # fmt: skip
    if previous is None:
        Path(address_file).unlink(missing_ok=True)
    else:
        Path(address_file).write_text(previous)
    nodes = {"head": cluster.head_node}

    def add(name: str, n: int) -> str:
        nodes[name] = cluster.add_node(num_cpus=n, resources={name: 1}, **_agent_ports())
        return nodes[name].node_id

    ids = {"head": cluster.head_node.node_id, **{f"worker{i}": add(f"worker{i}", cpus) for i in range(workers)}}
    cluster.wait_for_nodes()
    # What `ray start --head` leaves in its temp dir: where the Jobs API's supervisor on the head looks up the
    # address it gives a job's driver; without it, the supervisor takes any GCS running on the machine (another
    # test's Ray, with token auth, was seen).
    write_ray_address(cluster.address, temp)
    print(json.dumps({"address": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard}", "nodes": ids}))
    sys.stdout.flush()
    for line in sys.stdin:
        command, *args = line.split()
        try:
            if command == "kill":
                cluster.remove_node(nodes.pop(args[0]), allow_graceful=False)
                reply = {"killed": args[0]}
            elif command == "add":
                reply = {"node_id": add(args[0], int(args[1]))}
                cluster.wait_for_nodes()
            else:
                reply = {"error": f"unknown command {command!r}"}
        except Exception as err:  # the test sees it as its call's error
            reply = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(reply))
        sys.stdout.flush()
    cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    _keep(int(sys.argv[1]), int(sys.argv[2]))
