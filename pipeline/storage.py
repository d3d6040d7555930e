"""Object storage through fsspec: resolving URLs, atomic writes, safe messages.

Any fsspec URL works (s3://, gs://, file://, memory://, plain paths). S3 takes its
endpoint and credentials from the standard AWS environment, which s3fs (through
botocore) already reads; AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL are passed on
explicitly because not every botocore honours them for every client.
"""

from __future__ import annotations

import os
import re
import uuid

import fsspec

# credentials in URL query strings (presigned URLs): only after ? or &, so KEY=VALUE prose stays readable
_SECRET_QUERY = re.compile(r"(?i)([?&][\w.-]*(?:signature|credential|token|secret|key)[\w.-]*)=[^&\s]+")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


def storage_options(url: str) -> dict:
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding `url` and the path inside it."""
    return fsspec.core.url_to_fs(url, **storage_options(url))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` appear only complete: write-then-rename on local disks, a single
    PUT on object stores (an object is visible only once its upload finished)."""
    if is_local(fs):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def create_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create `path` only if it does not exist; False when it did. Atomic on local disks
    (a hard link of a complete temp file) and on S3 (a conditional put)."""
    if is_local(fs):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols or "s3a" in protocols:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
    if fs.exists(path):  # no conditional write here: the caller reads back to find the winner
        return False
    fs.pipe_file(path, data)
    return True


def redact(text: str) -> str:
    """Strip credentials that may hide in URLs or messages."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}=***", text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
