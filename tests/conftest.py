"""Shared fixtures: one real local Ray, one real S3 endpoint (moto's server on 127.0.0.1) and one Prefect
test harness per session.

Ray binds loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set before Ray is imported). The S3
variables are set before Ray starts so that its workers inherit them, as they would from a cluster's
environment; nothing reads credentials from a config file.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s (a missed poll is tolerated for 10 minutes): each
# training run waits up to that long to see its end and its checkpoints. 0.5 s saves ~2 s a run (measured:
# the two train_ae tests of 3 runs, 94 s -> 89 s); the suite has ~25 runs, and nothing else changes.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; yields a function that creates a fresh bucket and returns its name."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    import s3fs

    created = []

    def make_bucket(name: str) -> str:
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
        created.append(name)
        return name

    yield make_bucket
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real local Ray (2 CPUs), started after the S3 environment exists so workers inherit it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary API server for the session (~18 s to start), shared by the modules
    that run flows (tests/test_pipelines.py, tests/test_faults_stages.py)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def training_cluster():
    """A multi-node Ray for the training fault drills (tests/training_faults.py): a head (no CPUs) and three
    1-CPU worker nodes, so that after one node is lost two are left for the two training workers."""
    from tests.ray_cluster import LocalCluster

    started = LocalCluster.start(workers=3)
    yield started
    started.shutdown()
