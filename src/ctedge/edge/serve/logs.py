"""The node's log: one line per record, an ISO timestamp, nothing that identifies a patient.

Every record goes through one handler on stderr: ctedge's own, the libraries' loggers
(pynetdicom, pydicom, highdicom, uvicorn), Python warnings and uncaught exceptions of any
thread. Its formatter (``SafeFormatter``) redacts, unless ``--log-phi``:

* a DICOM UID (four or more dotted numbers, an IPv4 address aside) becomes ``uid:`` and 12
  hex digits of its sha256 (as everywhere in the node);
* a date (YYYYMMDD, YYYY-MM-DD, YYYY/MM/DD, YYYY.MM.DD) becomes ``<date>``, a person name
  in DICOM form (``FAMILY^GIVEN``) ``<name>``, a quoted value ``'…'``;
* a library's line (a warning, a library logger's record) keeps its words up to its first
  value (``Invalid value for VR DA …``), and the same line from the same place is written
  once a minute with a count of those held back;
* an exception is its type, its words up to the first value and where it was raised
  (``file:line function`` per frame): never its values, never the source lines.

``--log-format json`` writes one JSON object a line (time, level, logger, message, exception).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
import time
import traceback
import warnings
from datetime import datetime
from pathlib import Path

from ctedge.core.files import printable
from ctedge.core.logs import quiet_libraries
from ctedge.edge.serve.spool import uid_hash

THROTTLE_S = 60.0
UID = re.compile(r"(?<![\w.])(?!(?:\d{1,3}\.){3}\d{1,3}(?![\w.]))\d+(?:\.\d+){3,}(?![\w.])")  # not an IPv4 address
MAX_FRAMES = 8
DATE = re.compile(r"\b(?:19|20)\d\d([-/.]?)(?:0[1-9]|1[0-2])\1(?:0[1-9]|[12]\d|3[01])\b")
PERSON_NAME = re.compile(r"[^\s'\"^=()\[\]{},;]*\^[^\s'\"=()\[\]{},;]*")
QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"")  # not the apostrophe of "node's"
FIRST_VALUE = re.compile(r"""['"]|:\s""")


def redact(text: str) -> str:
    """``text`` without UIDs (hashed), dates, DICOM person names or quoted values."""
    text = UID.sub(lambda match: "uid:" + uid_hash(match.group()), text)
    text = DATE.sub("<date>", text)
    text = PERSON_NAME.sub("<name>", text)
    return QUOTED.sub("'…'", text)


def summarise(text: str) -> str:
    """A library's message reduced to its words before the first value (a quote, or ': ')."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    match = FIRST_VALUE.search(line)
    if match:
        line = (line[:match.start()].rstrip(" :,.") + " …").strip()
    return redact(line)


def describe_exception(exc: BaseException) -> str:
    """An exception (and what caused it) as its types, summarised words and frames, on one line."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)[-MAX_FRAMES:]
        where = " < ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames))
        parts.append(f"{exc.__class__.__name__}: {summarise(exc)}" + (f" at {where}" if where else ""))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return " | caused by ".join(parts)


def _own(record: logging.LogRecord) -> bool:
    return record.name == "ctedge" or record.name.startswith("ctedge.")


class SafeFormatter(logging.Formatter):
    """One line (text) or one JSON object per record, redacted unless ``log_phi``."""

    def __init__(self, fmt: str = "text", log_phi: bool = False):
        super().__init__()
        self.json, self.log_phi = fmt == "json", log_phi

    def format(self, record: logging.LogRecord) -> str:
        message = self._message(record)
        exception = self._exception(record)
        held = getattr(record, "held_back", 0)
        if held:
            message += f" ({held} more like this in the last {getattr(record, 'held_for', THROTTLE_S):g} s)"
        when = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")
        if self.json:
            return json.dumps({"time": when, "level": record.levelname, "logger": record.name, "message": message,
                               "exception": exception}, ensure_ascii=False)
        return f"{when} {record.levelname} {record.name}: {message}" + (f" [{exception}]" if exception else "")

    def _message(self, record: logging.LogRecord) -> str:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: its format string alone
            text = str(record.msg)
        if not self.log_phi:
            text = redact(text) if _own(record) else summarise(text)
        return _one_line(text)

    def _exception(self, record: logging.LogRecord) -> str | None:
        if not record.exc_info or record.exc_info[1] is None:
            return None
        if self.log_phi:
            return _one_line("".join(traceback.format_exception(*record.exc_info)))
        return _one_line(describe_exception(record.exc_info[1]))


def _one_line(text: str) -> str:
    return printable(text.rstrip().replace("\r\n", "\n").replace("\n", " | "))


class LibraryThrottle(logging.Filter):
    """A library's record from one place passes once a minute; the next that passes says how many were held."""

    def __init__(self, every: float = THROTTLE_S):
        super().__init__()
        self.every, self.lock = every, threading.Lock()
        self.places: dict[tuple, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pydicom" and record.funcName == "warn_and_log":
            return False  # pydicom's warnings come twice: as a warning (kept) and as this record
        if _own(record) and not getattr(record, "library", False):
            return True
        key = (record.name, record.pathname, record.lineno, getattr(record, "library", None))
        now = time.monotonic()
        with self.lock:
            last, held = self.places.get(key, (-self.every, 0))
            if now - last < self.every:
                self.places[key] = (last, held + 1)
                return False
            self.places[key] = (now, 0)
        record.held_back, record.held_for = held, self.every
        return True


_warnings_log = logging.getLogger("ctedge.warnings")


def _show_warning(message, category, filename, lineno, file=None, line=None, log_phi: bool = False) -> None:
    """``warnings.showwarning``: a library warning as one summarised, throttled record."""
    where = "/".join(Path(filename).parts[-2:])
    _warnings_log.warning("%s from %s:%d: %s", category.__name__, where, lineno,
                          str(message) if log_phi else summarise(message), extra={"library": f"{filename}:{lineno}"})


def _uncaught(exc_type, exc, tb, thread_name: str = "main") -> None:
    logging.getLogger("ctedge.serve").error("uncaught exception in thread %s", thread_name,
                                            exc_info=(exc_type, exc, tb))


def setup_logging(fmt: str = "text", log_phi: bool = False, level: int = logging.INFO) -> logging.Handler:
    """The root logger's one handler (stderr), library levels, warnings and uncaught exceptions
    routed to it; returns the handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter(fmt, log_phi))
    handler.addFilter(LibraryThrottle())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet_libraries()
    if log_phi:  # the library's own message is the point of --log-phi: hand its values through
        _warnings_log.warning("--log-phi: patient data and UIDs are written to this log unredacted")
    warnings.showwarning = functools.partial(_show_warning, log_phi=log_phi)
    sys.excepthook = _uncaught
    threading.excepthook = lambda args: _uncaught(args.exc_type, args.exc_value, args.exc_traceback,
                                                  args.thread.name if args.thread else "?")
    return handler
