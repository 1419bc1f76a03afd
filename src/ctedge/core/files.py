"""File helpers shared by the pipeline stages: digests, atomic writes, output checks, locks."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import stat
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
    """A temp file beside ``path``, new for each call and naming this process (for
    ``remove_stale_temps``): ``.NAME.PID.TOKEN.tmp`` + ``suffix`` (a writer such as
    ``model.save`` may need its own suffix)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp{suffix}")


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


def atomic_write(data: bytes, path: Path, *, durable: bool = True, fresh_name: bool = False) -> None:
    """Temp file in the target folder, fsync, rename, fsync the folder: a crash leaves
    the old file or the new one, never half of one, and with ``durable`` the new one is
    on disk when this returns. Only a new path or a regular file is written (a symlink
    to one: the file it names); permissions follow the umask (0666 & ~umask). Temp files
    of earlier killed writers of ``path`` are removed first, unless ``fresh_name``: the
    caller made the name up just now (a spool entry), so there are none to look for.
    A failed write (disk full, ``ulimit -f``) raises ``WriteError`` naming ``path``."""
    target = output_target(Path(path))
    tmp = temp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not fresh_name:
            remove_stale_temps(target)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if durable:
            sync_folder(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: OSError) -> WriteError:
    """``exc`` as a WriteError naming ``path``, its errno kept (ENOSPC tells a full disk)."""
    error = WriteError(f"{path}: cannot write ({exc.strerror or exc})")
    error.errno = exc.errno
    return error


def replace_synced(written: Path, final: Path) -> None:
    """A temp file another writer filled (a library saving a model) synced to disk, then
    renamed onto ``final``: never half a file there."""
    with open(written, "rb") as f:
        os.fsync(f.fileno())
    os.replace(written, final)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename or a new file in it survives a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise CtedgeError(f"{what} {path}: not writable")
    probe = temp_name(target / "ctedge-probe")  # os.access says yes to root, even where nothing can be made
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise CtedgeError(f"{what} {path}: not writable ({exc.strerror})") from None


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


def _holder(lock: int | Path) -> dict:
    """What a lock file (a path, or an fd open on it) says of its holder ({} when nothing
    readable)."""
    try:
        text = os.pread(lock, 4096, 0) if isinstance(lock, int) else Path(lock).read_bytes()
        holder = json.loads(text or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_open(path: Path) -> int:
    """An fd on ``path`` holding its flock; raises BlockingIOError when another holds it.
    The lock is on the file at ``path`` now: a holder that was releasing (unlinking) as
    we opened leaves us the old file, so we open again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` while the block runs: an flock (the kernel drops it when the holder
    dies, so a killed holder's lock is free at once and only one process can take it),
    with the holder's pid, host and start time inside for the message.

    Held by a live process: exit 2 naming it. A lock file naming another host is refused
    too (a network file system may not share flocks between hosts)."""
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now().isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock_open(path)
    except BlockingIOError:
        holder = _holder(path)
        raise CtedgeError(f"{what} is in use by process {holder.get('pid')} on {holder.get('host')} since "
                          f"{holder.get('started')} ({path}); wait for it") from None
    try:
        holder = _holder(fd)
        if holder and holder.get("host") != mine["host"]:
            raise CtedgeError(f"{what} is in use by process {holder.get('pid')} on {holder.get('host')} since "
                              f"{holder.get('started')} ({path}); wait for it, or delete the lock file if that "
                              "process is gone")
        if holder:
            log.warning("taking over %s: its holder, process %s on %s, is gone", path, holder.get("pid"),
                        holder.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding it: the next holder opens a new file
    finally:
        os.close(fd)


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
