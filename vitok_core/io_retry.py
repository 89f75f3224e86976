"""Transient vs permanent I/O errors and bounded retries: the one policy every stage reads its inputs with.

    data = read_bytes("s3://bucket/raw/a.jpg", cfg.io)          # retried while transient, handle closed
    table = retry_call(lambda: read_group(uri), cfg.io, uri)     # any read, retried the same way
    classify(err)                                                # "transient" | "permanent"

- transient: 5xx, throttling (SlowDown, Throttling, 429), timeouts, connection resets / refusals / drops,
  truncated bodies. Retried `retries` times with exponential backoff (`backoff_s`, doubling, at most
  `max_backoff_s` a wait, equal jitter). One that outlives its retries is raised as `TransientIOError`: the
  task fails (Ray Data retries it `io.task_retries` times, then the stage fails and a rerun redoes only the
  tasks that did not finish). A stage never turns it into a reject.
- permanent: not found (404, NoSuchKey), access denied (403), other 4xx, and bytes that do not decode (a
  corrupt tar shard or Parquet file). Raised at once, never retried; the stage rejects the image with the
  reason, or fails when the input is its own artifact rather than a source image.
- an error that is neither (nothing in it is known) counts as transient: retried, then the task fails with
  the error named. A loud failure can be fixed; a silently dropped image is never seen. A programming error
  (TypeError, AttributeError, ...: BUG_TYPES) is raised at once, neither retried nor a reject.

Only PERMANENT errors may become rejects: a caller rejects an input when `classify(err) == PERMANENT` and
raises anything else.

The exception, its `__cause__` and its `__context__` (s3fs and tarfile wrap the error that happened) are read
in this order: the server's answer (a botocore ClientError's code and HTTP status, an aiohttp response
status, pyarrow's "AWS Error CODE" / "HTTP status N"), then transient types and errnos, then permanent ones.

The layers under this one: botocore retries 5xx, throttling and connection errors itself (legacy mode, 5
attempts); s3fs wraps that in its own retries (`retries=5`, nested twice for reads: up to 125 requests and
minutes per read for a persistent timeout). Reads here use an s3fs filesystem whose loop makes one attempt
(`url_to_fs`, S3FS_RETRIES), so s3fs's loop is replaced by this one and a persistent transient error costs at
most botocore's 5 attempts x (1 + retries). pyarrow's S3 filesystem (the training loaders) retries 3 attempts of
its own, under this layer likewise. Writes and listings keep s3fs's and botocore's defaults.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import fsspec

log = logging.getLogger("vitok.io")

TRANSIENT, PERMANENT = "transient", "permanent"
T = TypeVar("T")

# Our retries replace s3fs's own loop (botocore's attempts stay): see the module docstring. (s3fs takes its
# `retries` from the class, not the constructor: reads use a subclass, with an instance cache of its own.)
S3FS_RETRIES = 1

# S3 / AWS error codes (botocore ClientError) that are transient whatever their HTTP status (S3 answers
# RequestTimeout with 400).
TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
# pyarrow's S3 errors read "AWS Error CODE during ...": the AWS SDK's names of the transient ones.
TRANSIENT_AWS_SDK = {
    "SLOW_DOWN",
    "THROTTLING",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT",
    "REQUEST_LIMIT_EXCEEDED",
}
PERMANENT_AWS_SDK = {"ACCESS_DENIED", "NO_SUCH_KEY", "NO_SUCH_BUCKET", "RESOURCE_NOT_FOUND", "NO_SUCH_UPLOAD"}
# Exception classes by name anywhere in the MRO, so that optional packages need not be imported: botocore,
# aiohttp, urllib3, http.client, fsspec and s3fs name what went wrong on the wire.
TRANSIENT_TYPES = {
    "TimeoutError",  # builtins; socket.timeout and asyncio.TimeoutError are it
    "ConnectionError",  # builtins: reset, refused, aborted, broken pipe
    "FSTimeoutError",  # fsspec
    "HTTPClientError",  # botocore: ConnectionClosedError, ReadTimeoutError, ... derive from it
    "EndpointConnectionError",  # botocore (a ConnectionError of botocore's own)
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",  # botocore: the body broke off
    "IncompleteReadError",
    "ResponseParserError",  # botocore: a half-sent error document (s3fs retries it too)
    "ClientConnectionError",  # aiohttp: ServerDisconnectedError, ClientOSError, ...
    "ClientPayloadError",  # aiohttp: truncated body
    "ServerTimeoutError",
    "IncompleteRead",  # http.client / urllib3
    "RemoteDisconnected",
    "ProtocolError",  # urllib3
    "NewConnectionError",
}
TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,  # s3fs: 503 SlowDown / ServiceUnavailable
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ENETRESET,
    errno.EHOSTDOWN,
    errno.EHOSTUNREACH,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: 500 InternalError
}
PERMANENT_TYPES = {
    "FileNotFoundError",
    "PermissionError",
    "IsADirectoryError",
    "NotADirectoryError",
    # undecodable bytes
    "TarError",
    "EOFError",
    "BadGzipFile",
    "LZMAError",
    "error",  # zlib.error
    "ValueError",  # UnicodeDecodeError, pyarrow's ArrowInvalid (a corrupt Parquet file), PIL's decoders
    "UnidentifiedImageError",
}
PERMANENT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}
# Errors of the code, not of the data or the wire: raised at once by retry_call (and never a reject).
BUG_TYPES = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    AssertionError,
    NotImplementedError,
    RecursionError,
    SyntaxError,
)


class TransientIOError(OSError):
    """A transient I/O error that outlived its retries. The task must fail with it (Ray Data retries the task,
    then the stage fails and a rerun completes); a stage never makes it a reject. Its message starts with
    TRANSIENT_MARK, which is what Ray Data's map retries match (jobs.common.retry_transient_tasks)."""


TRANSIENT_MARK = "transient I/O error"


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------
def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo and len(seen) < 16:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _names(e: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(e).__mro__}


def _from_status(status: int) -> str | None:
    if status >= 500 or status in (408, 429):
        return TRANSIENT
    if 400 <= status < 500:
        return PERMANENT
    return None


def _server_answer(e: BaseException) -> str | None:
    """The classification a server's answer carried in `e`, if any."""
    response = getattr(e, "response", None)
    if isinstance(response, Mapping) and ("Error" in response or "ResponseMetadata" in response):  # botocore
        code = str(response.get("Error", {}).get("Code", ""))
        if code in TRANSIENT_CODES:
            return TRANSIENT
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is None and code.isdigit():
            status = int(code)
        return _from_status(int(status)) if status else None
    if "ClientResponseError" in _names(e) and isinstance(getattr(e, "status", None), int):  # aiohttp
        return _from_status(e.status)  # type: ignore[attr-defined]
    if isinstance(e, OSError) and "AWS Error" in str(e):  # pyarrow's S3 filesystem
        text = str(e)
        match = re.search(r"AWS Error ([A-Z_]+)", text)
        if match and match.group(1) in TRANSIENT_AWS_SDK:
            return TRANSIENT
        if match and match.group(1) in PERMANENT_AWS_SDK:
            return PERMANENT
        status = re.search(r"HTTP status (?:code )?(\d{3})", text)
        return _from_status(int(status.group(1))) if status else None
    return None


def classify(err: BaseException) -> str:
    """TRANSIENT or PERMANENT (see the module docstring; unknown errors are TRANSIENT)."""
    chain = list(_chain(err))
    for e in chain:
        answer = _server_answer(e)
        if answer is not None:
            return answer
    for e in chain:
        if isinstance(e, TransientIOError) or _names(e) & TRANSIENT_TYPES:
            return TRANSIENT
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return TRANSIENT
    for e in chain:
        if _names(e) & PERMANENT_TYPES or (isinstance(e, OSError) and e.errno in PERMANENT_ERRNOS):
            return PERMANENT
    return TRANSIENT


def describe(err: BaseException, limit: int = 300) -> str:
    """`ErrorType: message` of an error, cut to `limit` characters (a reject's detail)."""
    return f"{type(err).__name__}: {err}"[:limit]


# --------------------------------------------------------------------------------------------------
# Retrying
# --------------------------------------------------------------------------------------------------
def settings(retry: Any = None) -> tuple[int, float, float]:
    """(retries, backoff_s, max_backoff_s) of an `io` config section (dataclass, OmegaConf node or dict);
    None gives the defaults."""
    if retry is None:
        from vitok_core.config import RetryConfig

        retry = RetryConfig()
    get = retry.get if isinstance(retry, Mapping) else lambda k: getattr(retry, k)
    return int(get("retries")), float(get("backoff_s")), float(get("max_backoff_s"))


def backoff(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """The wait before retry `attempt` (0-based): backoff_s * 2^attempt, at most max_backoff_s, equal jitter."""
    ceiling = min(max_backoff_s, backoff_s * 2**attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_call(
    fn: Callable[[], T], retry: Any = None, what: str = "", sleep: Callable[[float], None] = time.sleep
) -> T:
    """`fn()`, retried while it raises transient errors. A permanent error (or a BUG_TYPES one) is raised at
    once, as it is; a transient one that outlives the retries is raised as TransientIOError (from it)."""
    retries, backoff_s, max_backoff_s = settings(retry)
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if isinstance(err, BUG_TYPES) or classify(err) == PERMANENT:
                raise
            if attempt == retries:
                raise TransientIOError(
                    f"{TRANSIENT_MARK} reading {what or 'an input'}, still failing after {retries + 1} attempts: "
                    f"{describe(err)}"
                ) from err
            wait = backoff(attempt, backoff_s, max_backoff_s)
            log.warning(
                "%s reading %s (attempt %d of %d), retrying in %.2f s: %s",
                TRANSIENT_MARK,
                what,
                attempt + 1,
                retries + 1,
                wait,
                describe(err),
            )
            sleep(wait)
    raise AssertionError("unreachable")


@functools.cache
def _s3_reader() -> type:
    import s3fs

    class ReadS3FileSystem(s3fs.S3FileSystem):
        """s3fs for reads through this module: its own retry loop makes S3FS_RETRIES attempts."""

        retries = S3FS_RETRIES

    return ReadS3FileSystem


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `uri`; on s3:// one whose own retry loop is replaced by ours (the
    endpoint and credentials from the environment, as fsspec's default)."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        fs = _s3_reader()()
        return fs, fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def read_bytes(uri: str, retry: Any = None) -> bytes:
    """The whole object at `uri` (one GET on S3), retried per the policy; no handle is left open."""

    def once() -> bytes:
        fs, path = url_to_fs(uri)
        if isinstance(fs, _s3_reader()):
            return fs.cat_file(path, max_concurrency=1)  # one GET (the default asks for the size first)
        return fs.cat_file(path)

    return retry_call(once, retry, uri)
