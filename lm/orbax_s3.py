"""Checkpoints at s3:// paths. Orbax 0.12 writes arrays through TensorStore, which has an S3 driver,
but it builds TensorStore's storage spec for gs:// and local paths only (an s3:// path collapses to
a relative `s3:/...` and is refused), and it treats only gs:// as an object store: a bucket has no
atomic rename, so a step there is final once its commit file is written, and deleting one is a
recursive delete. `install()` extends both to s3://, at the four places orbax decides them.

TensorStore's S3 driver does not read the variables boto (s3fs) uses, so they are passed on here:
the endpoint (`AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`: MinIO, moto, a private cloud) and the
region (`AWS_REGION`, else `AWS_DEFAULT_REGION`); keys in the environment are used as boto uses them,
first, which also spares the AWS SDK's complaints about a missing ~/.aws/config.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

PREFIX = "s3://"
_HOOKS = {"gcs_utils": ("is_gcs_path", "get_kvstore_for_gcs"),
          "tensorstore_utils": ("_use_gcs_driver", "_normalize_path")}
_installed: bool | None = None


def is_s3(path: Any) -> bool:
    return str(path).startswith(PREFIX)


def kvstore_spec(url: str) -> dict[str, Any]:
    """TensorStore's kvstore spec for `s3://bucket/key...`, reached as boto would reach it."""
    bucket, _, key = url[len(PREFIX):].partition("/")
    spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        spec["endpoint"] = endpoint
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def _modules() -> dict[str, Any] | None:
    """Orbax's two modules that decide storage, when they still have the functions patched here."""
    try:
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils
    except ImportError:
        return None
    modules = {"gcs_utils": gcs_utils, "tensorstore_utils": tensorstore_utils}
    if all(hasattr(modules[m], name) for m, names in _HOOKS.items() for name in names):
        return modules
    return None


def _extend(modules: dict[str, Any]) -> None:
    gcs, ts = modules["gcs_utils"], modules["tensorstore_utils"]
    is_gcs, gcs_spec = gcs.is_gcs_path, gcs.get_kvstore_for_gcs
    use_gcs, normalize = ts._use_gcs_driver, ts._normalize_path
    gcs.is_gcs_path = lambda path: is_s3(path) or is_gcs(path)
    gcs.get_kvstore_for_gcs = lambda path: kvstore_spec(path) if is_s3(path) else gcs_spec(path)
    ts._use_gcs_driver = lambda directory: is_s3(directory) or use_gcs(directory)
    ts._normalize_path = lambda path: (PREFIX + posixpath.normpath(path[len(PREFIX):])
                                       if is_s3(path) else normalize(path))


def install() -> bool:
    """Teach orbax s3:// (once per process); False when this orbax lacks the places to do it."""
    global _installed
    if _installed is None:
        modules = _modules()
        if modules is not None:
            _extend(modules)
        _installed = modules is not None
    return _installed
