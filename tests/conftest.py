"""Shared test fixtures: a real local Ray with fake GPUs, moto's S3 server."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
# the shared kits beside the checkout; GENFLEET_FIXTURES names another copy (e.g. on a GPU machine)
FIXTURES = Path(os.environ.get("GENFLEET_FIXTURES") or ROOT.parent / "shared" / "fixtures")
TOY = "tests.toy_family:FAMILY"


def shared_fixture(name: str) -> Path:
    """A file or kit under ../shared/fixtures. Missing: the test fails under CI=true
    (CI must prove parity) and is skipped elsewhere (a checkout without the kits)."""
    path = FIXTURES / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared fixture {name} not found at {path} (CI=true: fixtures are required)")
        pytest.skip(f"shared fixture {name} not found at {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FileServer:
    """A directory served over HTTP on 127.0.0.1 (url files of a model, say); `gets` lists the paths GET asked for."""

    def __init__(self, root: Path):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.root, self.gets = root, []
        gets = self.gets

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                gets.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()


class Hold:
    """Requests to the store that wait in the proxy, so that a test can act while a process is at a known point
    (kill it while it writes a commit record, say). Matching requests (method, a regex searched in the path),
    after the first `skip`, are held `before` they reach the store or `after` it answered (the store has the
    object, the client does not know). `reached` is set when the first is held. A held request goes on at
    `release()`; it is dropped (never forwarded, or never answered) when its client goes away (`gone` is set:
    the process holding the connection died) or the hold ends with `drop()`."""

    def __init__(self, method: str, pattern: str, when: str = "before", skip: int = 0):
        import threading

        assert when in ("before", "after")
        self.method, self.pattern, self.when, self.skip = method, pattern, when, skip
        self.reached, self.gone, self._go, self._drop = (threading.Event() for _ in range(4))
        self.held: list[str] = []

    def matches(self, method: str, path: str, when: str) -> bool:
        import re

        if when != self.when or method != self.method or not re.search(self.pattern, path):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def wait(self, handler, path: str) -> bool:
        """Hold one request; True to let it go on."""
        import select
        import socket

        self.held.append(path)
        self.reached.set()
        conn = handler.connection
        while not self._go.wait(0.05):
            if self._drop.is_set():
                return False
            try:
                readable, _, _ = select.select([conn], [], [], 0)
                closed = bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
            except OSError:  # reset by the peer
                closed = True
            if closed:  # the client closed its end: it died
                self.gone.set()
                return False
        return True

    def release(self):
        self._go.set()

    def drop(self):
        self._drop.set()


class FaultProxy:
    """An HTTP proxy in front of moto that fails a share of requests the way object stores
    do under load: 503 SlowDown, 500 InternalError, or a connection reset mid-request.
    `fault_rate` is 0 (pass through) until a test raises it. `holding(...)` holds chosen
    requests (see Hold)."""

    def __init__(self, target_port: int):
        import http.client
        import random
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.fault_rate, self.faults, self.requests = 0.0, 0, 0
        self._rng, self._lock = random.Random(1234), threading.Lock()
        self.holds: list[Hold] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _held(self, when: str) -> bool:
                """Whether this request is dropped by a hold (after waiting in it)."""
                with proxy._lock:
                    hold = next((h for h in proxy.holds if h.matches(self.command, self.path, when)), None)
                if hold is None or hold.wait(self, self.path):
                    return False
                self.close_connection = True
                return True

            def _handle(self):
                body = self._body()
                if self._held("before"):
                    return
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy._rng.random() < proxy.fault_rate
                    kind = proxy._rng.choice(("503", "500", "reset")) if fault else None
                    proxy.faults += fault
                if kind == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if kind is not None:
                    code, name = (503, "SlowDown") if kind == "503" else (500, "InternalError")
                    err = f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "content-length")}
                conn = http.client.HTTPConnection("127.0.0.1", target_port)
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers={**headers, "Content-Length": str(len(body))})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if self._held("after"):
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # a HEAD answer has no body but tells the object's size
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client killed mid-request (the tests do that) is not news

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @contextlib.contextmanager
    def holding(self, method: str, pattern: str, when: str = "before", skip: int = 0):
        """Hold matching requests while the block runs; what is still held at its end is dropped."""
        hold = Hold(method, pattern, when, skip)
        with self._lock:
            self.holds.append(hold)
        try:
            yield hold
        finally:
            with self._lock:
                self.holds.remove(hold)
            hold.drop()

    def stop(self):
        self.server.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 behind a FaultProxy, with the standard AWS environment
    pointing at the proxy. Yields the environment, plus "proxy" and "direct" (moto's own URL)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    proxy = FaultProxy(port)
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{proxy.port}",
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {**env, "proxy": proxy, "direct": f"http://127.0.0.1:{port}"}  # direct: moto itself, past the proxy
    proxy.stop()
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket; returns its s3:// URL."""
    import boto3

    name = "b-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL_S3"]).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray for the session: 4 logical CPUs and 2 declared (fake) GPUs.
    Started after moto so that its workers inherit the S3 environment."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # ray.data.read_parquet (the readers' test) starts 32 footer-reading actors per read by default, a
    # process each: seconds of start-up on a small machine for the few files a test output has
    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "2"
    ray.init(address="local", num_cpus=4, num_gpus=2, object_store_memory=400 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "2"}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def write_manifest(url: str, rows: list[dict] | dict, schema: pa.Schema | None = None, row_group_size: int | None = None) -> str:
    """Write rows (or a column dict) as one Parquet file at `url` (fsspec)."""
    from pipeline.storage import filesystem

    table = pa.table(rows, schema=schema) if isinstance(rows, dict) else pa.Table.from_pylist(rows, schema=schema)
    fs, path = filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)
    return url
