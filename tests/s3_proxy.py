"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto in tests), for tests and benchmarks.

    with S3FaultProxy(upstream, fail_fraction=0.1, seed=0, latency_s=0.02) as proxy:
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}      # clients (and Ray workers) use the proxy
        ...
        proxy.stats()  # {"requests": ..., "forwarded": ..., "faults": {"slowdown": ..., ...}, ...}

    python -m tests.s3_proxy --upstream http://127.0.0.1:5000 --fail 0.1 --latency-ms 20   # standalone

Every request (any method, body and headers as they came, Host included, so SigV4 signatures stay valid) is
forwarded to `upstream` over HTTP/1.1, after `latency_s`, unless it is chosen to fail. The choice is
deterministic: the n-th request with a given (method, path and query, Range header) fails when a SHA-256 of
(seed, method, target, range, n) falls under `fail_fraction`, so a client's retry of a failed request is a
fresh draw, and the same sequence of requests meets the same faults whatever threads interleave. The kind of
fault is drawn the same way from `faults`:

    slowdown   503 with S3's SlowDown error document (throttling), not forwarded
    internal   500 with S3's InternalError error document, not forwarded
    reset      the connection is closed with a TCP reset, no response, not forwarded
    stall      nothing is sent for `stall_s`, then the connection is closed, not forwarded (a client whose read
               timeout is shorter than stall_s sees a timeout; a longer one sees the connection dropped)
    truncate   (GET only; other methods get `reset`) forwarded, the status and headers sent with the full
               Content-Length, then half the body, then a reset
    denied     403 with S3's AccessDenied error document, not forwarded: a permanent error, never in the
               default mix (pass faults=["denied"] with `only` to refuse one object)

Faults other than truncate happen before forwarding, so a failed request never changed anything upstream:
retrying any method is safe. `only` (a prefix of the request path, e.g. "/bucket/") and `methods` (e.g.
["GET"]) limit faults to matching requests; the rest are forwarded untouched. `fail_first=n` replaces the draw:
each matching request key fails its first n times, then goes through (a fault that outlives n retries).
`deny` (path prefixes) are always answered 403 AccessDenied, counted apart (`denied`): a permanent error.
`configure(...)` changes any of these while the proxy runs.

It stops by itself after `max_requests` requests or `max_lifetime_s` seconds, whichever comes first
(`stopped_reason` says which); a stopped proxy refuses connections. Counters are read under a lock.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "stall", "truncate")  # transient: the default mix
PERMANENT = ("denied",)  # chosen explicitly, e.g. with `only` on one object
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>s3-fault-proxy</RequestId></Error>"
)
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


class S3FaultProxy:
    """See the module docstring. Start with `start()` or a `with` block; `url` is what clients use."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_fraction: float = 0.0,
        faults: Sequence[str] = FAULTS,
        seed: int = 0,
        latency_s: float = 0.0,
        stall_s: float = 1.0,
        only: str = "",
        methods: Sequence[str] = (),
        fail_first: int = 0,
        deny: Sequence[str] = (),
        max_requests: int = 100_000,
        max_lifetime_s: float = 600.0,
        port: int = 0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream={upstream!r}: must be http://host:port")
        self.upstream = (parts.hostname, parts.port or 80)
        self._lock = threading.Lock()
        self.configure(
            fail_fraction=fail_fraction,
            faults=faults,
            seed=seed,
            latency_s=latency_s,
            stall_s=stall_s,
            only=only,
            methods=methods,
            fail_first=fail_first,
            deny=deny,
        )
        self.max_requests, self.max_lifetime_s = max_requests, max_lifetime_s
        self._seen: Counter = Counter()  # request key -> times seen
        self._requests = 0
        self._forwarded = 0
        self._by_method: Counter = Counter()
        self._faults: Counter = Counter()
        self._denied = 0
        self._fault_log: list[tuple[str, str, str]] = []  # (method, path, kind)
        self.stopped_reason = ""
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.proxy = self
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._started = 0.0

    def configure(self, **settings: Any) -> None:
        """Change fail_fraction, faults, seed, latency_s, stall_s, only, methods, fail_first or deny (the
        constructor's meanings) from now on. The per-key request counts are kept."""
        allowed = {"fail_fraction", "faults", "seed", "latency_s", "stall_s", "only", "methods", "fail_first", "deny"}
        if set(settings) - allowed:
            raise TypeError(f"unknown settings {sorted(set(settings) - allowed)}; allowed: {sorted(allowed)}")
        faults = tuple(settings.get("faults", getattr(self, "faults", FAULTS)))
        if not faults or set(faults) - set(FAULTS) - set(PERMANENT):
            raise ValueError(f"faults={list(faults)}: must be a non-empty subset of {list(FAULTS + PERMANENT)}")
        fraction = float(settings.get("fail_fraction", getattr(self, "fail_fraction", 0.0)))
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fail_fraction={fraction}: must be in [0, 1]")
        with self._lock:
            for name, value in settings.items():
                if name in ("methods",):
                    value = {m.upper() for m in value}
                elif name in ("faults", "deny"):
                    value = tuple(value)
                setattr(self, name, value)

    # -------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> S3FaultProxy:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop, kwargs={"reason": "max_lifetime_s"})
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self, reason: str = "stopped") -> None:
        with self._lock:
            if self.stopped_reason:
                return
            self.stopped_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        if threading.current_thread() is not self._thread:
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- counters
    def stats(self) -> dict[str, Any]:
        """requests (all received), forwarded, by_method, faults by kind, faults_total (injected transient and
        `faults` ones), denied (the `deny` answers), fault_log [(method, path, kind)], stopped (why, or "")."""
        with self._lock:
            return {
                "requests": self._requests,
                "forwarded": self._forwarded,
                "by_method": dict(self._by_method),
                "faults": dict(self._faults),
                "faults_total": sum(self._faults.values()),
                "denied": self._denied,
                "fault_log": list(self._fault_log),
                "stopped": self.stopped_reason,
                "uptime_s": time.monotonic() - self._started if self._started else 0.0,
            }

    # -------------------------------------------------------------------------------- the decision
    def _admit(self, method: str, target: str, byte_range: str) -> tuple[bool, str]:
        """(admitted, fault kind or ""). Not admitted: over max_requests (the proxy then stops)."""
        with self._lock:
            if self.stopped_reason:
                return False, ""
            self._requests += 1
            self._by_method[method] += 1
            if self._requests > self.max_requests:
                over = True
            else:
                over = False
                key = (method, target, byte_range)
                n = self._seen[key]
                self._seen[key] = n + 1
        if over:
            threading.Thread(target=self.stop, kwargs={"reason": "max_requests"}, daemon=True).start()
            return False, ""
        path = target.split("?", 1)[0]
        if any(path.startswith(prefix) for prefix in self.deny):
            with self._lock:
                self._denied += 1
            return True, "denied"
        if not target.startswith(self.only) or (self.methods and method not in self.methods):
            return True, ""
        digest = hashlib.sha256(f"{self.seed}|{method}|{target}|{byte_range}|{n}".encode()).digest()
        if self.fail_first > 0:
            if n >= self.fail_first:
                return True, ""
        elif int.from_bytes(digest[:8], "big") / 2**64 >= self.fail_fraction:
            return True, ""
        kind = self.faults[int.from_bytes(digest[8:12], "big") % len(self.faults)]
        if kind == "truncate" and method != "GET":
            kind = "reset"
        with self._lock:
            self._faults[kind] += 1
            self._fault_log.append((method, target, kind))
        return True, kind

    def _counted_forward(self) -> None:
        with self._lock:
            self._forwarded += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: S3FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:  # clients dropping connections: quiet
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; every response has a Content-Length
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for the client's delayed
    # ACK, ~40 ms more per request than the latency asked for (measured by benchmarks/bench_scale.py).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def finish(self) -> None:
        with contextlib.suppress(Exception):  # a reset or stalled connection is already closed
            super().finish()

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    # -------------------------------------------------------------------------------- one request
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()  # always read whole, so that a fault never leaves a body on the connection
        admitted, fault = proxy._admit(self.command, self.path, self.headers.get("Range", ""))
        if not admitted:
            self._drop(reset=False)
            return
        if proxy.latency_s > 0:
            time.sleep(proxy.latency_s)
        if fault in _ERRORS:
            status, reason, code, message = _ERRORS[fault]
            data = b"" if self.command == "HEAD" else _ERROR_BODY.format(code=code, message=message).encode()
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        if fault == "reset":
            self._drop(reset=True)
            return
        if fault == "stall":
            time.sleep(proxy.stall_s)
            self._drop(reset=False)
            return
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            self._drop(reset=True)  # upstream unreachable: the client sees a reset, as from a dying proxy
            return
        proxy._counted_forward()
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._drop(reset=True)
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.server.proxy.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            if body or self.command in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _drop(self, reset: bool) -> None:
        """Close the client connection without a response: a TCP reset (SO_LINGER 0) or an orderly close."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="the S3 endpoint, http://host:port")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail", type=float, default=0.0, help="fraction of requests that fail")
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--stall-s", type=float, default=1.0)
    parser.add_argument("--only", default="", help="path prefix that may fail (e.g. /bucket/)")
    parser.add_argument("--methods", default="", help="methods that may fail, comma-separated (default: all)")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--max-lifetime-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    proxy = S3FaultProxy(
        args.upstream,
        fail_fraction=args.fail,
        faults=args.faults.split(","),
        seed=args.seed,
        latency_s=args.latency_ms / 1000,
        stall_s=args.stall_s,
        only=args.only,
        methods=[m for m in args.methods.split(",") if m],
        max_requests=args.max_requests,
        max_lifetime_s=args.max_lifetime_s,
        port=args.port,
    ).start()
    print(proxy.url, flush=True)
    try:
        while not proxy.stopped_reason:
            time.sleep(0.2)
    except KeyboardInterrupt:
        proxy.stop("interrupted")
    stats = proxy.stats()
    stats.pop("fault_log")
    print(stats, flush=True)


if __name__ == "__main__":
    main()
