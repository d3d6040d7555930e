"""Transient or permanent: which failures a later attempt may cure, and bounded retries.

Transient: storage and network errors (timeouts, dropped connections, throttling and
5xx answers from object stores), CUDA out-of-memory. Permanent: everything a retry
would only repeat: a missing file, bad input, a deterministic model error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_TRANSIENT_NAMES = {"OutOfMemoryError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                    "IncompleteRead", "ResponseStreamingError", "FSTimeoutError", "ProtocolError"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def is_transient(e: BaseException) -> bool:
    if e.__cause__ is not None and e.__cause__ is not e and is_transient(e.__cause__):
        return True  # e.g. fsspec's HTTP FileNotFoundError raised from a refused connection
    for cls in type(e).__mro__:
        if cls.__name__ in _TRANSIENT_NAMES:
            return True
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        err = response.get("Error", {})
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return str(err.get("Code")) in _TRANSIENT_CODES or int(status) >= 500
    if isinstance(e, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    if isinstance(e, OSError):  # s3fs / fsspec wrap transport failures in OSError
        # PIL's UnidentifiedImageError and friends are OSErrors too, but never reach here:
        # decoding converts them to RowErrors first.
        return e.errno is None or e.errno not in (2, 13, 20, 21)
    return False


def with_retries(fn: Callable[[], T], *, attempts: int = 4, backoff: float = 0.5, what: str = "call") -> T:
    """Call `fn`; on a transient failure wait (backoff, doubling) and try again, at most
    `attempts` times in all. Permanent failures and the last transient one propagate."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if attempt + 1 >= attempts or not is_transient(e):
                raise
            delay = backoff * 2**attempt
            log.info("%s failed (%s: %s); retrying in %.1fs", what, type(e).__name__, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
