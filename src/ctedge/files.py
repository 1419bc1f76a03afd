"""File helpers shared by the pipeline stages: digests and atomic writes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(data: bytes, path: Path) -> None:
    """Temp file in the target folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """Refuse an output path that can't be written, before any work is done.

    ``-`` (stdout) passes; a missing parent (or, with ``folder``, the folder itself)
    is created."""
    from .errors import CtedgeError

    if str(path) == "-":
        return
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtedgeError(f"{what} {path}: cannot create {target} ({exc.strerror})") from None
    if (not folder and path.is_dir()) or not os.access(target, os.W_OK) or \
            (not folder and path.exists() and not os.access(path, os.W_OK)):
        raise CtedgeError(f"{what} {path}: not writable")
