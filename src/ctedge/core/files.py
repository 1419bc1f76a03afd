"""File helpers shared by the pipeline stages: digests, atomic writes, output checks, locks."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ctedge.core.errors import CtedgeError

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


class WriteError(CtedgeError, OSError):
    """An output that could not be written (disk full, file size limit, not a
    regular file): names the path and the reason. An ``OSError`` too, so callers
    that treat a failed write as optional keep doing so."""


def output_target(path: Path) -> Path:
    """Where a write to ``path`` lands: the path itself, or the regular file a
    symbolic link names (the link is kept). Anything else is refused."""
    if not os.path.lexists(path):
        return path
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise WriteError(f"{path}: cannot write ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise WriteError(f"{path}: is a folder, not a file (name a file inside it)")
    real = Path(os.path.realpath(path))
    system = {Path(os.path.abspath(path)).parts[1:2], real.parts[1:2]} & {("dev",), ("proc",)}
    if not stat.S_ISREG(mode) or system:
        raise WriteError(f"{path}: is not a regular file (a device, FIFO, socket or /dev/stdout); "
                         "outputs are new or regular files, and - is stdout")
    return real if os.path.islink(path) else path


def atomic_write(data: bytes, path: Path) -> None:
    """Temp file in the target folder, then rename: never a half-written file.
    Temp files of earlier killed writers of ``path`` are removed first. Only a new
    path or a regular file is written (a symlink to one: the file it names); a
    failed write (disk full, ``ulimit -f``) raises ``WriteError`` naming ``path``."""
    target = output_target(Path(path))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as exc:
        raise WriteError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: Path, what: str, folder: bool = False) -> None:
    """Refuse an output path that can't be written, before any work is done.

    ``-`` (stdout) passes. A file output must be new or a regular file (or a
    symlink to one); a folder, device, FIFO or socket is refused. A missing parent
    (or, with ``folder``, the folder itself) is created."""
    if str(path) == "-" and not folder:
        return
    if folder and path.exists() and not path.is_dir():
        raise CtedgeError(f"{what} {path}: is not a folder")
    if not folder:
        try:
            path = output_target(path)
        except WriteError as exc:
            raise CtedgeError(f"{what} {exc}") from None
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CtedgeError(f"{what} {path}: cannot create {target} ({exc.strerror})") from None
    if not os.access(target, os.W_OK) or (not folder and path.exists() and not os.access(path, os.W_OK)):
        raise CtedgeError(f"{what} {path}: not writable")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file (symlinks and hard links included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """Text from a file (a path, a PatientID) made safe to show: control characters
    (terminal escape sequences) become ``?``, undecodable bytes of file names too."""
    text = "" if value is None else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates of undecodable names
    return CONTROL.sub("?", text)


SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, limit: int = 80) -> str:
    """``text`` as one harmless file name: letters, digits, ``.``, ``_``, ``-`` only
    (runs of anything else become ``_``), no leading dot, at most ``limit`` characters."""
    name = SAFE_NAME.sub("_", text).lstrip(".")[:limit]
    return name or "unnamed"


def safe_child(folder: Path, name: str) -> Path:
    """``folder / name`` for a name derived from data (a UID, a PatientID, a file
    name from the network): sanitised with ``safe_name`` (suffix kept) and checked to
    resolve directly inside ``folder``, so no name can reach outside it."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or not re.fullmatch(r"[A-Za-z0-9]{1,16}", suffix):
        stem, suffix = name, ""
    clean = safe_name(stem) + ("." + suffix if suffix else "")
    child = Path(folder) / clean
    if Path(os.path.realpath(child)).parent != Path(os.path.realpath(folder)):
        raise CtedgeError(f"{name!r}: not a file name inside {folder}")
    return child


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


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A cell a spreadsheet shows as text, never runs (OWASP CSV injection): a string
    starting with ``= + - @``, tab or CR gets a leading ``'``; numbers, and strings
    that are plain numbers (``-0.5``), stay as they are."""
    if not isinstance(value, str) or not value.startswith(FORMULA_START):
        return value
    try:
        float(value)
        return value
    except ValueError:
        return "'" + value


def csv_text(fields: list[str], rows: list[dict]) -> str:
    """Rows as CSV text with a header, for an atomic write or stdout; every cell
    passes ``csv_cell``."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in rows)
    return buffer.getvalue()
