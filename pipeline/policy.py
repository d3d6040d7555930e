"""Which inputs a job may read on a manifest's behalf.

Manifests may be written by someone else: an input URL must not reach the cluster's own
disks or private network for them. Allowed by default: inline bytes, and URLs in the
manifest's own bucket (same scheme and bucket). Everything else must be allowed by the
job spec: local paths under `inputs.allow_local` roots (checked after resolving
symlinks), and URL prefixes in `inputs.allow_urls`. An http(s) host that resolves to a
loopback, private or link-local address is refused unless its allowed prefix names that
address itself.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from pipeline.sample import RowError
from pipeline.storage import redact

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")


@dataclass(frozen=True)
class FetchPolicy:
    own_prefix: str | None = None  # the manifest's own bucket, "s3://bucket/" (None for a local manifest)
    allow_local: tuple[str, ...] = ()  # resolved root directories
    allow_urls: tuple[str, ...] = ()
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    resolve: object = field(default=socket.getaddrinfo, compare=False, repr=False)  # DNS, replaceable in tests

    @classmethod
    def for_manifest(cls, manifest_url: str, *, allow_local=(), allow_urls=(), max_bytes: int, max_pixels: int) -> FetchPolicy:
        return cls(own_prefix=bucket_prefix(manifest_url), allow_local=tuple(os.path.realpath(os.path.expanduser(r)) for r in allow_local),
                   allow_urls=tuple(allow_urls), max_bytes=max_bytes, max_pixels=max_pixels)

    def check(self, url: str) -> None:
        """Raise RowError("input_not_allowed", rule) unless the job may read `url`."""
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        if scheme in ("", "file", "local"):
            path = os.path.realpath(url.split("://", 1)[1] if "://" in url else url)
            if not any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in self.allow_local):
                raise RowError("input_not_allowed", f"input {redact(url)}: local paths are read only under inputs.allow_local "
                                                    f"(allowed: {', '.join(self.allow_local) or 'none'})")
            return
        if scheme in OBJECT_STORES:
            if (self.own_prefix and url.startswith(self.own_prefix)) or self._listed(url):
                return
            raise RowError("input_not_allowed", f"input {redact(url)}: not in the manifest's bucket "
                                                f"({self.own_prefix or 'a local manifest has none'}) nor in inputs.allow_urls")
        if scheme in ("http", "https"):
            prefix = self._listed(url)
            if prefix is None:
                raise RowError("input_not_allowed", f"input {redact(url)}: http(s) inputs are read only from inputs.allow_urls")
            self._check_addresses(url, prefix)
            return
        raise RowError("input_not_allowed", f"input {redact(url)}: the scheme {scheme!r} is not allowed")

    def _listed(self, url: str) -> str | None:
        return next((p for p in self.allow_urls if url.startswith(p)), None)

    def _check_addresses(self, url: str, prefix: str) -> None:
        host = urlsplit(url).hostname or ""
        if _is_ip(host) and host == urlsplit(prefix).hostname:
            return  # the spec names this very address
        try:
            infos = self.resolve(host, None)  # type: ignore[operator]
        except OSError as e:
            raise RowError("input_unavailable", f"input {redact(url)}: cannot resolve {host} ({e})", retryable=True) from None
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if addr.is_loopback or addr.is_private or addr.is_link_local or addr.is_reserved or addr.is_multicast:
                raise RowError("input_not_allowed", f"input {redact(url)}: {host} resolves to {addr}, a non-public address; "
                                                    "list the address itself in inputs.allow_urls to allow it")


def bucket_prefix(url: str) -> str | None:
    """`s3://bucket/a/b.parquet` -> `s3://bucket/`; None for local paths."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in OBJECT_STORES:
        return None
    return f"{parts.scheme}://{parts.netloc}/"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
