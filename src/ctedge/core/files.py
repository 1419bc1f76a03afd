"""File helpers shared by the pipeline stages: digests, atomic writes, output checks, locks."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temp_name(path: Path, suffix: str = "") -> Path:
    """A temp file beside ``path`` naming this process: ``.NAME.PID.tmp`` + ``suffix``
    (a writer such as ``model.save`` may need its own suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


def remove_stale_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by processes on this host that are gone
    (killed with -9 mid-write); a live writer's temp file is kept."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        pid = tmp.name[len(path.name) + 2:].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write(data: bytes, path: Path) -> None:
    """Temp file in the target folder, then rename: never a half-written file.
    Temp files of earlier killed writers of ``path`` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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
    from ctedge.core.errors import CtedgeError

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` (pid, host and start time inside) while the block runs.

    Another live holder: exit 2 naming it. A holder on this host whose process
    is gone (killed): its lock is taken over, with a message."""
    from ctedge.core.errors import CtedgeError

    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        for _ in range(2):
            try:
                os.link(tmp, path)  # atomic: created with its content, or not at all
                break
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if host != mine["host"] or not isinstance(pid, int) or _alive(pid):
                    raise CtedgeError(f"{what} is in use by process {pid} on {host} since "
                                      f"{holder.get('started')} ({path}); wait for it, or delete the "
                                      "lock file if that process is gone") from None
                log.warning("taking over %s: its holder, process %d on %s, is gone", path, pid, host)
                path.unlink(missing_ok=True)
        else:
            raise CtedgeError(f"{what}: could not take the lock {path}")
    finally:
        Path(tmp).unlink(missing_ok=True)
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass


def csv_text(fields: list[str], rows: list[dict]) -> str:
    """Rows as CSV text with a header, for an atomic write or stdout."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
