"""The I/O error policy (vitok_core/io_retry.py) on real errors, and the fault-injecting proxy (tests/s3_proxy.py)
in front of the session's moto server: every fault kind as s3fs and pyarrow raise it, classified; retries that
recover, run out (TransientIOError) or never start (permanent); the proxy forwarding every method intact, its
deterministic choice, its caps. No Ray here (tests/test_s3_faults.py runs the stages through the proxy)."""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.s3_proxy import FAULTS, S3FaultProxy
from vitok_core.config import ConfigError, load_config
from vitok_core.io_retry import (
    PERMANENT,
    TRANSIENT,
    TransientIOError,
    classify,
    read_bytes,
    retry_call,
    settings,
)

FAST = {"retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.02}
PAYLOAD = bytes(range(256)) * 400  # 100 KiB


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import s3fs

    name = s3_endpoint("vitok-io-retry")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{name}/x.bin", PAYLOAD)
    return name


def s3fs_via(proxy: S3FaultProxy, read_timeout: float = 5.0):
    """s3fs through the proxy, with botocore's and s3fs's own retries off: every fault reaches the caller."""
    import s3fs

    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": proxy.url},
        config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}, "read_timeout": read_timeout},
        skip_instance_cache=True,
    )
    fs.retries = 1  # s3fs reads it from the instance (its constructor does not take it)
    return fs


def arrow_via(proxy: S3FaultProxy, timeout: float = 5.0) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=proxy.url.split("//", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        request_timeout=timeout,
        connect_timeout=timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


def error_of(fn) -> BaseException:
    try:
        fn()
    except Exception as err:
        return err
    raise AssertionError("no error")


@pytest.mark.parametrize("kind", [*FAULTS, "timeout"])
def test_transient_faults_as_s3fs_and_pyarrow_raise_them(bucket, kind):
    """Each injected fault, as s3fs (GET whole object) and pyarrow (open + read) raise it, is transient; the
    stall outlasting the client's read timeout is a timeout."""
    fault = "stall" if kind == "timeout" else kind
    stall = 1.5 if kind == "timeout" else 0.1
    timeout = 0.5 if kind == "timeout" else 5.0
    with S3FaultProxy(
        os.environ["AWS_ENDPOINT_URL"], fail_fraction=1.0, faults=[fault], methods=["GET"], stall_s=stall
    ) as proxy:
        err = error_of(lambda: s3fs_via(proxy, timeout).cat_file(f"{bucket}/x.bin"))
        assert classify(err) == TRANSIENT, repr(err)
        if kind == "timeout":
            assert "Timeout" in "".join(type(e).__name__ for e in (err, err.__cause__, err.__context__) if e)
        arrow = arrow_via(proxy, timeout)

        def arrow_read() -> bytes:
            with arrow.open_input_file(f"{bucket}/x.bin") as f:
                return f.read()

        err = error_of(arrow_read)
        assert classify(err) == TRANSIENT, repr(err)
        assert proxy.stats()["faults"][fault] >= 2


def test_permanent_errors(bucket, tmp_path):
    """Not found and access denied through both clients, and undecodable bytes, are permanent."""
    with S3FaultProxy(os.environ["AWS_ENDPOINT_URL"], deny=[f"/{bucket}/x.bin"]) as proxy:
        fs, arrow = s3fs_via(proxy), arrow_via(proxy)
        for path in (f"{bucket}/x.bin", f"{bucket}/missing.bin"):
            assert classify(error_of(lambda path=path: fs.cat_file(path))) == PERMANENT
            assert classify(error_of(lambda path=path: arrow.open_input_file(path).read())) == PERMANENT
        assert proxy.stats()["denied"] >= 2
    assert classify(error_of(lambda: (tmp_path / "missing").read_bytes())) == PERMANENT
    (tmp_path / "bad.tar").write_bytes(b"not a tar archive" * 100)

    def read_tar() -> None:
        with tarfile.open(tmp_path / "bad.tar", mode="r|*") as tar:
            list(tar)

    assert classify(error_of(read_tar)) == PERMANENT
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    assert classify(error_of(lambda: pq.read_table(tmp_path / "bad.parquet"))) == PERMANENT


def test_retries_recover_run_out_or_never_start(bucket):
    # faults of one request each (aiohttp sends a request again, once, when its connection drops)
    with S3FaultProxy(
        os.environ["AWS_ENDPOINT_URL"], fail_first=2, faults=["slowdown", "internal", "truncate"], methods=["GET"]
    ) as proxy:
        fs = s3fs_via(proxy)
        assert retry_call(lambda: fs.cat_file(f"{bucket}/x.bin"), FAST, "x") == PAYLOAD  # 2 faults, then the data
        assert proxy.stats()["faults_total"] == 2 and proxy.stats()["by_method"]["GET"] == 3

        proxy.configure(fail_first=100)
        started = time.monotonic()
        with pytest.raises(TransientIOError, match="transient I/O error reading y, still failing after 4") as caught:
            retry_call(lambda: fs.cat_file(f"{bucket}/x.bin"), FAST, "y")
        assert classify(caught.value.__cause__) == TRANSIENT and classify(caught.value) == TRANSIENT
        assert time.monotonic() - started < 5
        assert proxy.stats()["faults_total"] == 2 + 4  # retries=3: four attempts

        proxy.configure(deny=[f"/{bucket}/x.bin"])  # permanent: raised as it is, on the first attempt
        before = proxy.stats()["requests"]
        with pytest.raises(PermissionError):
            retry_call(lambda: fs.cat_file(f"{bucket}/x.bin"), FAST, "z")
        assert proxy.stats()["requests"] == before + 1

    calls = []  # a programming error: raised at once, never retried (and, not being PERMANENT, never a reject)
    with pytest.raises(TypeError):
        retry_call(lambda: calls.append(1) or 1 + "a", FAST, "bug")
    assert calls == [1] and classify(TypeError("x")) == TRANSIENT


def test_read_bytes_local_and_s3_closes_its_handles(bucket, tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(PAYLOAD)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert read_bytes(str(path)) == PAYLOAD
    assert len(os.listdir("/proc/self/fd")) == fds
    assert read_bytes(f"s3://{bucket}/x.bin", FAST) == PAYLOAD
    for missing in (str(tmp_path / "missing"), f"s3://{bucket}/missing.bin"):
        with pytest.raises(FileNotFoundError):
            read_bytes(missing, FAST)


def test_io_config_keys():
    cfg = load_config("tiny")
    assert settings(cfg.io) == (5, 1.0, 30.0) == settings(None) and cfg.io.task_retries == 2
    for bad in ("io.retries=-1", "io.task_retries=-1", "io.backoff_s=-1", "io.max_backoff_s=0.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny", [bad])


# ------------------------------------------------------------------------------------------------
# The proxy itself
# ------------------------------------------------------------------------------------------------
def test_proxy_forwards_every_method_intact(bucket):
    import s3fs

    big = os.urandom(11 * 2**20)  # a multipart upload: POST (create), PUT x 3, POST (complete)
    with S3FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url}, skip_instance_cache=True)
        fs.pipe(f"{bucket}/p/small.bin", PAYLOAD)
        with fs.open(f"{bucket}/p/big.bin", "wb", block_size=5 * 2**20) as f:
            f.write(big)
        fs.copy(f"{bucket}/p/small.bin", f"{bucket}/p/copy.bin")
        assert fs.cat_file(f"{bucket}/p/big.bin") == big
        assert fs.cat_file(f"{bucket}/p/copy.bin", start=100, end=300) == PAYLOAD[100:300]
        assert fs.info(f"{bucket}/p/small.bin")["size"] == len(PAYLOAD)
        assert sorted(fs.ls(f"{bucket}/p", detail=False)) == [
            f"{bucket}/p/{n}" for n in ("big.bin", "copy.bin", "small.bin")
        ]
        fs.rm_file(f"{bucket}/p/copy.bin")  # DELETE (fs.rm deletes with a POST)
        assert not fs.exists(f"{bucket}/p/copy.bin")
    stats = proxy.stats()
    assert stats["faults_total"] == 0 and stats["requests"] == stats["forwarded"] and stats["stopped"] == "stopped"
    assert {"GET", "PUT", "POST", "HEAD", "DELETE"} <= set(stats["by_method"])


def get(proxy: S3FaultProxy, path: str) -> int:
    """One GET on a fresh connection: the status, or -1 when the connection was reset or dropped."""
    conn = http.client.HTTPConnection("127.0.0.1", int(proxy.url.rsplit(":", 1)[1]), timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (ConnectionError, http.client.HTTPException):
        return -1
    finally:
        conn.close()


def test_proxy_choice_is_seeded_and_deterministic(bucket):
    upstream = os.environ["AWS_ENDPOINT_URL"]
    logs = []
    for seed in (7, 7, 8):
        with S3FaultProxy(upstream, fail_fraction=0.3, seed=seed, stall_s=0.01) as proxy:
            statuses = [get(proxy, f"/{bucket}/x.bin") for _ in range(60)] + [
                get(proxy, f"/{bucket}/y") for _ in range(20)
            ]
            stats = proxy.stats()
        logs.append((statuses, stats["fault_log"]))
        not_forwarded = stats["faults_total"] - stats["faults"].get("truncate", 0)  # truncate forwards, then cuts
        assert 10 <= stats["faults_total"] <= 40 and stats["forwarded"] == 80 - not_forwarded
        failed = sum(statuses.count(status) for status in (500, 503, -1))  # a cut empty body still arrives whole
        assert not_forwarded <= failed <= stats["faults_total"]
    assert logs[0] == logs[1] and logs[0] != logs[2]


def test_proxy_stops_by_itself():
    upstream = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with S3FaultProxy(upstream, max_requests=3) as proxy:
        assert [get(proxy, "/") for _ in range(3)] != [-1] * 3
        assert get(proxy, "/") == -1  # the fourth: over the cap, dropped, and the proxy stops
        deadline = time.monotonic() + 5
        while proxy.stats()["stopped"] != "max_requests" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.stats()["stopped"] == "max_requests" and get(proxy, "/") == -1  # refused
    proxy = S3FaultProxy(upstream, max_lifetime_s=0.3).start()
    time.sleep(0.8)
    assert proxy.stats()["stopped"] == "max_lifetime_s" and get(proxy, "/") == -1


def test_parquet_of_pyarrow_through_retry_call(bucket):
    """A Parquet read through pyarrow recovers from a truncated body inside retry_call (as the loaders read)."""
    import s3fs

    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(1000))}), buffer)
    s3fs.S3FileSystem(skip_instance_cache=True).pipe(f"{bucket}/t.parquet", buffer.getvalue())
    with S3FaultProxy(os.environ["AWS_ENDPOINT_URL"], fail_first=1, faults=["truncate"], methods=["GET"]) as proxy:
        arrow = arrow_via(proxy)
        table = retry_call(lambda: pq.read_table(f"{bucket}/t.parquet", filesystem=arrow), FAST, "t")
        assert table["x"].to_pylist() == list(range(1000)) and proxy.stats()["faults_total"] >= 1
