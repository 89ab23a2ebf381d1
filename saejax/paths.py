"""Paths that may be local or in a bucket (`gs://...`): a run's workdir and an activation store
live wherever every host can see them, which on a Cloud TPU pod is a GCS bucket.

Local paths keep the strongest guarantees (writes are fsynced and renamed into place); remote
paths go through etils.epath (gcsfs for `gs://`, installed with `pip install saejax[gcs]`),
where an object write is atomic by itself. Tensorstore and orbax read and write buckets
directly, given `kvstore(path)`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return str(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path,
                                                                                       *parts)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    return ([p.name for p in epath.Path(path).iterdir()] if is_remote(path)
            else os.listdir(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
    """Removes a directory and everything in it; nothing if it does not exist."""
    if is_remote(path):
        epath.Path(path).rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never a torn one, even after a crash."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)  # one object upload: atomic
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut
    finally:
        os.close(dir_fd)


def write_text(path: str, text: str) -> None:
    """As `write_bytes`, UTF-8."""
    write_bytes(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, value: Any, **dump_kwargs) -> None:
    write_text(path, json.dumps(value, **dump_kwargs) + "\n")


def kvstore(path: str) -> dict:
    """The tensorstore key-value store spec of `path`: a local directory or a `gs://` one."""
    if str(path).startswith("gs://"):
        bucket, _, key = str(path)[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": key.rstrip("/") + "/"}
    if is_remote(path):
        raise ValueError(f"{path}: only local paths and gs:// are supported for arrays.")
    return {"driver": "file", "path": os.path.abspath(path)}
