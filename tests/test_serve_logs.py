"""`ctedge serve`'s log lines: one record a line, ISO time, text or JSON, redacted (unit tests of
ctedge.edge.serve.logs; the whole process is checked in test_serve_ops.py)."""

from __future__ import annotations

import json
import logging
import sys
import time

from ctedge.edge.serve.logs import LibraryThrottle, SafeFormatter, redact, summarise
from ctedge.edge.serve.spool import uid_hash

STUDY_UID = "1.2.826.0.1.3680043.10.1.4242424242"


def _record(name: str, message: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 10, message, args, exc_info)


def _failure():
    try:
        try:
            raise KeyError(STUDY_UID)
        except KeyError as exc:
            raise ValueError("Unable to convert '1961-05-12' to 'DA' object\nfor SENTINEL^NAME") from exc
    except ValueError:
        return sys.exc_info()


def test_own_lines_are_redacted_and_library_lines_summarised():
    assert redact(f"study {STUDY_UID} of DOE^JOHN born 19610512 ('SENTINEL') from 10.1.2.3, this node's") == (
        f"study uid:{uid_hash(STUDY_UID)} of <name> born <date> ('…') from 10.1.2.3, this node's")
    assert summarise("Invalid value for VR DA: '1961-05-12'. Please see <https://x>") == "Invalid value for VR DA …"
    assert summarise('copy Patient-related attributes from dataset "1.2.3.4.5"') == \
        "copy Patient-related attributes from dataset …"
    assert summarise("The value length (26) exceeds the maximum length of 16 allowed for VR SH.") == \
        "The value length (26) exceeds the maximum length of 16 allowed for VR SH."


def test_a_record_is_one_line_with_an_iso_time_and_an_exception_without_values():
    text = SafeFormatter("text").format(_record("ctedge.edge.serve.assembler", "study %s: no SR", STUDY_UID,
                                                exc_info=_failure()))
    assert "\n" not in text and STUDY_UID not in text and "1961" not in text and "SENTINEL" not in text
    when, level, rest = text.split(" ", 2)
    assert time.strptime(when[:19], "%Y-%m-%dT%H:%M:%S") and when[23] in "+-" and level == "ERROR"
    assert rest.startswith("ctedge.edge.serve.assembler: study uid:")
    assert "[ValueError: Unable to convert … at test_serve_logs.py:" in rest and "caused by KeyError: …" in rest
    library = SafeFormatter("text").format(_record("highdicom.base", "copy from dataset \"%s\"", STUDY_UID))
    assert library.endswith("highdicom.base: copy from dataset …")


def test_json_lines_for_collectors_and_log_phi_keeps_values():
    line = SafeFormatter("json").format(_record("ctedge.serve", "study %s", STUDY_UID, exc_info=_failure()))
    document = json.loads(line)
    assert set(document) == {"time", "level", "logger", "message", "exception"} and "\n" not in line
    assert STUDY_UID not in line and document["exception"].startswith("ValueError: Unable to convert …")
    unredacted = SafeFormatter("text", log_phi=True).format(_record("ctedge.serve", "study %s", STUDY_UID,
                                                                    exc_info=_failure()))
    assert STUDY_UID in unredacted and "1961-05-12" in unredacted and "\n" not in unredacted


def test_a_repeated_library_line_is_written_once_per_period_with_a_count():
    throttle = LibraryThrottle(every=0.2)
    records = [_record("pydicom", "Invalid value") for _ in range(5)]
    assert [throttle.filter(r) for r in records] == [True, False, False, False, False]
    assert throttle.filter(_record("ctedge.serve", "ours, every time"))
    time.sleep(0.25)
    later = _record("pydicom", "Invalid value")
    assert throttle.filter(later) and later.held_back == 4
    assert "(4 more like this in the last 0.2 s)" in SafeFormatter().format(later)
