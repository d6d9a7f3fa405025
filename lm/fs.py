"""The one filesystem layer: every path a user gives or lm derives, on a local disk or in a bucket.

`path("gs://bucket/run")`, `path("s3://bucket/run")` and `path("runs/run")` are etils `epath.Path`s,
the path type orbax checkpoints with: local paths go to the operating system, bucket paths to fsspec
(gcsfs, s3fs; `pip install -e ".[cloud]"`), so every host of a pod sees the same `--workdir`. What
epath lacks (recursive globs, ranged reads, object versions, appending) comes from the same fsspec
filesystems here. Clients find their endpoints and credentials in their own environment variables
(docs/scaling.md), which is also how the tests point them at local emulators.

Filesystem trouble (a missing bucket, a file where a directory belongs, no permission, a full disk)
becomes a one-line `ConfigError` naming the path and the fix: `errors(path)` around the operation.
"""

from __future__ import annotations

import contextlib
import errno
import glob as local_glob
import hashlib
import importlib
import os
import re
import shutil
import tempfile
import threading
from typing import Any, Iterator

import numpy as np
from etils import epath

from lm.config import ConfigError

Path = epath.Path
PathLike = str | os.PathLike
INSTALL = 'pip install -e ".[cloud]"'
_CLIENTS = {"gs": "gcsfs", "s3": "s3fs"}  # scheme -> the fsspec package that serves it
# Errors of the storage clients that are not OSErrors (credentials, connections), by module.
_CLIENT_MODULES = ("botocore", "aiobotocore", "google.auth", "google.api_core", "aiohttp",
                   "gcsfs", "s3fs")
# TensorStore, orbax's array writer, names the operating system's error in its message (which
# orbax re-raises as a ValueError from a background save): `Failed writing: "/path": ...
# [os_error_code='28']`.
_TENSORSTORE_OS_ERROR = re.compile(r"os_error_code='?(\d+)")
# A request the storage service refused names its absl status code first and the HTTP status
# among its payloads: `PERMISSION_DENIED: Error writing ... at gs://...: <the service's message>
# [http_response_body='...'] [http_response_code='403']`.
_TENSORSTORE_DENIED = ("PERMISSION_DENIED: ", "UNAUTHENTICATED: ")
_HTTP_STATUS = re.compile(r"http_response_code='?(\d+)")


def _fresh_listings() -> None:
    """No directory listing is cached: other hosts and tensorstore (orbax's array writer) write
    into the same buckets, so a listing gcsfs or s3fs kept would go stale (a checkpoint step
    unseen). An fsspec configuration the user set wins."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_fresh_listings()


def scheme(p: PathLike) -> str | None:
    """`gs`, `s3` (or another URL scheme) for a bucket path; None for a local one."""
    match = re.match(r"([a-z][a-z0-9+.-]*)://", os.fspath(p))
    return match.group(1) if match else None


def is_remote(p: PathLike) -> bool:
    return scheme(p) is not None


def path(p: PathLike) -> Path:
    """`p` as an epath.Path; a bucket path whose client is missing is a one-line error."""
    text = os.fspath(p)
    kind = scheme(text)
    if kind is not None:
        if kind not in _CLIENTS:
            raise ConfigError(f"{text}: lm reads and writes local paths, gs:// and s3://, not "
                              f"{kind}://")
        try:
            importlib.import_module(_CLIENTS[kind])
        except ImportError:
            raise ConfigError(f"{text}: {kind}:// paths need the `{_CLIENTS[kind]}` package: "
                              f"{INSTALL}") from None
    return epath.Path(text)


def absolute(p: PathLike) -> Path:
    """A local path made absolute (orbax needs one); a bucket path as it is."""
    return path(p) if is_remote(p) else epath.Path(os.path.realpath(os.fspath(p)))


def filesystem(p: PathLike):
    """The fsspec filesystem serving `p` (a bucket path)."""
    import fsspec

    path(p)  # the client is installed
    return fsspec.filesystem(scheme(p) or "file")


def bucket(p: PathLike) -> str:
    """`gs://bucket` of `gs://bucket/a/b`."""
    text = os.fspath(p)
    return text[:text.index("://") + 3] + text.split("://", 1)[1].split("/", 1)[0]


def _missing_bucket(p: PathLike) -> str | None:
    if not is_remote(p):
        return None
    try:
        return None if filesystem(p).exists(bucket(p)) else bucket(p)
    except Exception:  # noqa: BLE001 (unreachable, no credentials: the original error says more)
        return None


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _refusal(error: BaseException) -> str:
    """What a storage service said when it refused a request, as one line: gcsfs raises
    `Forbidden: <url>` with the service's message on the next line; os_error() keeps TensorStore's.
    """
    lines = str(error).strip().splitlines()
    if lines and lines[0].startswith("Forbidden"):
        return f"HTTP 403: {' '.join(lines[1:])}" if lines[1:] else "HTTP 403 Forbidden"
    return first_line(error)


def explain(error: BaseException, p: PathLike, writing: bool = False) -> str:
    """One line naming the path, what is wrong with it and the fix (`writing`: the operation
    wrote there, so the fix for a refusal is write access)."""
    local_name = getattr(error, "filename", None)
    where = os.fspath(local_name) if local_name and not is_remote(p) else os.fspath(p)
    reason = _refusal(error) if is_remote(p) else first_line(error)
    if isinstance(error, FileNotFoundError):
        missing = _missing_bucket(p)
        if missing:
            return (f"{where}: the bucket {missing} does not exist (or these credentials cannot "
                    f"see it); create it, or fix the path")
        return f"{where} does not exist; check the path"
    if isinstance(error, IsADirectoryError):
        return f"{where} is a directory where a file is needed; pass a file"
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        return (f"{where} exists and is a file where a directory is needed; remove it, or pass "
                f"another path")
    if isinstance(error, PermissionError) or reason.startswith(("Forbidden", "HTTP 403")):
        if not is_remote(p):
            fix = "fix its permissions or choose another path"
        elif writing:
            fix = ("grant the credentials the storage client uses (docs/scaling.md) write access "
                   "to the bucket, or write elsewhere (what was written before is intact)")
        else:
            fix = ("check the credentials the storage client uses (docs/scaling.md) and the "
                   "bucket's permissions")
        return f"{where}: permission denied ({reason}); {fix}"
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return (f"{where}: no space left on the device; free space or write elsewhere (what was "
                f"written before is intact)")
    if getattr(error, "errno", None) == errno.EFBIG:
        return (f"{where}: file too large for the filesystem or for this process's file-size "
                f"limit (ulimit -f); raise the limit or write elsewhere (what was written before "
                f"is intact)")
    return f"{where}: {reason}"


def is_storage_error(error: BaseException) -> bool:
    """An OSError, or an error of a storage client (credentials, connection)."""
    return isinstance(error, OSError) or type(error).__module__.startswith(_CLIENT_MODULES)


def os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, one it was raised from, or one TensorStore names (an
    operating system's error, or a storage service's refusal as a PermissionError)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        text = str(error)
        if code := _TENSORSTORE_OS_ERROR.search(text):
            files = re.findall(r'"(/[^"]+)"', text)
            return OSError(int(code[1]), os.strerror(int(code[1])), files[-1] if files else None)
        if text.startswith(_TENSORSTORE_DENIED):
            said = text.split(" [", 1)[0].rsplit(": ", 1)[-1]  # the service's own message
            status = _HTTP_STATUS.search(text)
            return PermissionError(f"HTTP {status[1] if status else 403}: {said}")
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def errors(p: PathLike, writing: bool = False) -> Iterator[None]:
    """Turn filesystem and storage-client errors raised inside into a ConfigError about `p`
    (`writing`: the operation inside writes to `p`, which a refusal's fix names)."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        cause = e if is_storage_error(e) else os_error(e)
        if cause is None:
            raise
        raise ConfigError(explain(cause, p, writing)) from None


# ---------------------------------------------------------------------------------------------
# Whole files and directories.

def read_text(p: PathLike) -> str:
    with errors(p):
        return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
    with errors(p):
        return path(p).read_bytes()


def write_text(p: PathLike, text: str) -> None:
    with errors(p):
        with path(p).open("w", encoding="utf-8") as f:
            f.write(text)


def write_bytes(p: PathLike, data: bytes) -> None:
    with errors(p):
        path(p).write_bytes(data)


def exists(p: PathLike) -> bool:
    with errors(p):
        return path(p).exists()


def is_file(p: PathLike) -> bool:
    with errors(p):
        return path(p).is_file()


def is_dir(p: PathLike) -> bool:
    """A local directory, or a bucket prefix that holds objects."""
    with errors(p):
        return path(p).is_dir()


def makedirs(p: PathLike) -> Path:
    """Make the directory `p` (and its parents). A bucket has no directories, so a bucket path is
    only checked: its bucket must exist and no object may sit at the path itself."""
    with errors(p):
        target = path(p)
        if not is_remote(p):
            target.mkdir(parents=True, exist_ok=True)
            return target
        if _missing_bucket(p):
            raise FileNotFoundError(os.fspath(p))
        if target.is_file():
            raise FileExistsError(os.fspath(p))
        return target


def listdir(p: PathLike) -> list[Path]:
    """The entries of a directory (none when it does not exist)."""
    with errors(p):
        target = path(p)
        return sorted(target.iterdir()) if target.is_dir() else []


def remove_tree(p: PathLike) -> None:
    with errors(p):
        target = path(p)
        if target.is_dir():
            target.rmtree()
        elif target.exists():
            target.unlink()


def expand(pattern: str) -> list[str]:
    """The files a file, directory (all files below it) or glob names, in a fixed order."""
    if not is_remote(pattern):
        if os.path.isdir(pattern):
            found = [os.path.join(root, name) for root, _, names in os.walk(pattern)
                     for name in names]
            # In the order of their path components (pathlib's order), not of their text.
            return sorted((f for f in found if os.path.isfile(f)),
                          key=lambda f: os.path.relpath(f, pattern).split(os.sep))
        return sorted(local_glob.glob(pattern, recursive=True))
    with errors(pattern):
        fs = filesystem(pattern)
        if _missing_bucket(pattern):
            raise FileNotFoundError(pattern)
        if fs.isdir(pattern):
            found = fs.find(pattern)
        else:
            found = [f for f in fs.glob(pattern) if not fs.isdir(f)]
        return sorted(fs.unstrip_protocol(f) for f in found)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local path holding `p`'s bytes, for readers that need one (safetensors, torch): `p`
    itself, or a temporary download of a bucket object, deleted afterwards."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    with tempfile.TemporaryDirectory(prefix="lm-download-") as tmp:
        local = os.path.join(tmp, path(p).name)
        with errors(p):
            filesystem(p).get_file(os.fspath(p), local)
        yield local


def upload(local: str, p: PathLike) -> None:
    """Copy the local file `local` to `p` (a bucket path or a local one)."""
    with errors(p):
        if is_remote(p):
            filesystem(p).put_file(local, os.fspath(p))
        else:
            shutil.copyfile(local, os.fspath(p))


class AppendFile:
    """A text file that grows line by line (metrics.jsonl). Locally an appended file; in a bucket,
    whose objects cannot be appended to, the whole text is rewritten by a background thread after
    each write (the latest text wins, writes never wait on the network), and `close` waits for the
    final upload."""

    def __init__(self, p: PathLike):
        self.path = os.fspath(p)
        self._remote = is_remote(p)
        with errors(p):
            if not self._remote:
                self._file = open(self.path, "a", encoding="utf-8")
                return
            target = path(p)
            self._text = target.read_text() if target.exists() else ""
        self._version = self._uploaded = 0
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._upload_loop, daemon=True,
                                        name=f"upload {self.path}")
        self._thread.start()

    def write(self, text: str) -> None:
        if not self._remote:
            try:
                self._file.write(text)
                self._file.flush()
            except OSError as e:  # the text stays unwritten: closing must not retry it
                with contextlib.suppress(OSError):
                    self._file.close()
                raise ConfigError(explain(e, self.path)) from None
            return
        with self._changed:
            self._raise_upload_error()
            self._text += text
            self._version += 1
            self._changed.notify()

    def _upload_loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._version > self._uploaded or self._closing)
                if self._version == self._uploaded:
                    return
                text, version = self._text, self._version
            try:
                write_text(self.path, text)
            except ConfigError as e:
                with self._changed:
                    self._error = e
                return
            with self._changed:
                self._uploaded = version

    def _raise_upload_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if not self._remote:
            if not self._file.closed:
                with errors(self.path):
                    self._file.close()
            return
        with self._changed:
            self._closing = True
            self._changed.notify()
        self._thread.join()
        self._raise_upload_error()


# ---------------------------------------------------------------------------------------------
# Token shards: memory-mapped where local; in a bucket, cached locally or read by ranges.

class RangedArray:
    """A 1-D array stored raw in a bucket object, read by ranged requests: a slice fetches only
    its own bytes, so a host reads the windows it batches and nothing else."""

    def __init__(self, p: PathLike, dtype: Any, num_bytes: int):
        self.path, self.dtype = os.fspath(p), np.dtype(dtype)
        self._fs = filesystem(p)
        self._length = num_bytes // self.dtype.itemsize

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self._length)
        if step != 1:
            raise IndexError("RangedArray reads contiguous slices only")
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        with errors(self.path):
            data = self._fs.cat_file(self.path, start=start * size, end=stop * size)
        return np.frombuffer(data, self.dtype)


def object_version(info: dict) -> str:
    """What changes whenever an object's bytes do: GCS's generation, S3's ETag, else mtime."""
    for key in ("generation", "ETag", "etag", "mtime", "LastModified"):
        if info.get(key):
            return str(info[key])
    return ""


def _cached(p: str, info: dict, cache_dir: str) -> str:
    """A local copy of the object `p` in `cache_dir`, downloaded once per object version; a
    partial download never takes the final name."""
    key = hashlib.sha256(f"{p}\0{object_version(info)}\0{info['size']}".encode()).hexdigest()
    local = os.path.join(os.path.expanduser(cache_dir), key[:2], f"{key[:24]}-{path(p).name}")
    if os.path.exists(local) and os.path.getsize(local) == info["size"]:
        return local
    with errors(cache_dir):
        os.makedirs(os.path.dirname(local), exist_ok=True)
        partial = f"{local}.partial-{os.getpid()}"
        try:
            with errors(p):
                filesystem(p).get_file(p, partial)
            os.replace(partial, local)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return local


def token_array(p: PathLike, dtype: Any, cache_dir: str = ""):
    """A raw shard as a 1-D array: memory-mapped when local; a bucket object is memory-mapped from
    a copy in `cache_dir` (made once per object version), or read by ranges without one."""
    text = os.fspath(p)
    if not is_remote(text):
        with errors(text):
            return np.memmap(text, dtype=dtype, mode="r")
    with errors(text):
        info = filesystem(text).info(text)
    if cache_dir:
        return np.memmap(_cached(text, info, cache_dir), dtype=dtype, mode="r")
    return RangedArray(text, dtype, int(info["size"]))
