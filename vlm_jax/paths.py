"""Paths of run files, local or in cloud storage (``gs://bucket/run``), all through etils.epath.

``epath.Path`` keeps ``gs://`` intact (``pathlib.Path`` turns it into ``gs:/bucket``, a local
directory) and reads and writes it with gcsfs through fsspec, or with ``tf.io.gfile`` when
tensorflow is installed. Object stores have no append and no atomic rename: the writers of
growing files (:mod:`vlm_jax.metrics`) rewrite whole objects instead, which GCS makes atomic.

:func:`remote_problem` checks once, before a command starts work, that the endpoint answers and
the bucket exists, so that a wrong bucket or an unreachable endpoint gives a clear error in
seconds instead of a traceback after the storage clients' retries (gcsfs retries a refused
connection for ~35 s, tensorstore for minutes).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import tempfile
import urllib.parse
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike

GCS_ENDPOINT = "https://storage.googleapis.com"


def is_remote(path: PathLike) -> bool:
    """True for object-store paths (``gs://``, ``s3://``...)."""
    return "://" in os.fspath(path)


def _gcs_endpoint() -> str:
    """The endpoint gcsfs and tensorstore talk to: ``STORAGE_EMULATOR_HOST`` (an emulator, as
    gcsfs reads it) or Cloud Storage itself."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return GCS_ENDPOINT
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def remote_problem(path: PathLike, timeout: float = 10.0) -> str | None:
    """For a ``gs://`` path: a message saying what is wrong and what to do if its storage
    endpoint does not accept connections or its bucket does not exist; None if both are fine or
    the path is local. (Other errors, e.g. permissions, are left to the operation that meets
    them, which names them.)"""
    path = os.fspath(path)
    if not path.startswith("gs://"):
        return None
    bucket = path[len("gs://"):].split("/", 1)[0]
    endpoint = _gcs_endpoint()
    url = urllib.parse.urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:  # One connection attempt, instead of the clients' retries with backoff.
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        via = ("STORAGE_EMULATOR_HOST" if endpoint != GCS_ENDPOINT else "Cloud Storage")
        return (f"{path}: cannot connect to the storage endpoint {endpoint} ({via}): {e}. "
                + ("Start the emulator or unset STORAGE_EMULATOR_HOST."
                   if endpoint != GCS_ENDPOINT else
                   "Check this machine's network access to Cloud Storage."))
    try:
        exists = epath.Path(f"gs://{bucket}").exists()
    except Exception:  # pylint: disable=broad-except  (e.g. no permission to get the bucket)
        return None  # Left to the operation itself, whose error names the object.
    if not exists:
        return (f"{path}: bucket gs://{bucket} does not exist (or these credentials cannot see "
                f"it). Create it (gcloud storage buckets create gs://{bucket}) or fix the path.")
    return None


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """``path`` itself if local; for a ``gs://`` file or directory, a temporary local copy of it
    (deleted afterwards). For readers that need a local file: safetensors memory-maps its input
    and torch / transformers-style directories are read by name, so neither takes a file object.

    Raises FileNotFoundError naming ``path`` when it does not exist.
    """
    if not is_remote(path):
        yield os.fspath(path)
        return
    src = epath.Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    with tempfile.TemporaryDirectory(prefix="vlm_jax_copy_") as tmp:
        dst = pathlib.Path(tmp) / src.name
        if src.is_dir():
            for f in src.rglob("*"):
                if f.is_file():
                    out = dst / os.fspath(f)[len(os.fspath(src)):].lstrip("/")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(f.read_bytes())
        else:
            dst.write_bytes(src.read_bytes())
        yield str(dst)
