"""Poll mode (``--poll AET@HOST:PORT|dicomweb:URL``): for a PACS that cannot push, the poll loop
asks it every ``--poll-every`` seconds for CT studies by StudyDate since the day of the last
poll, or of the oldest study it has still to take (the first from ``--poll-since``, default
today; C-FIND or QIDO-RS, the clients of ``ctedge.edge.pacs``), and takes each new one into
the spool as if it had been pushed, where the assembler classifies it.

The journal's ``polled`` table remembers every study seen, so none is taken twice, also
after a restart. A study is taken once it is seen twice with the same number of instances
(the PACS may still be receiving it); a study the node holds already (pushed, STOWed) is
left alone. Its series are judged by the rules on what the PACS says of them, and only
the best (the most instances) is retrieved (C-GET or WADO-RS, every instance checked
against what was asked) into a temp folder under the spool, then spooled through the
same checks as a C-STORE, as one association; a study whose series all fail the rules is
"not eligible" with nothing retrieved. A retrieval that fails is tried again at the next
polls, ``POLL_RETRIES`` times.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from ctedge.core.results import StudyResult
from ctedge.edge.pacs import PullError, StudyRef, choose_series
from ctedge.edge.serve import intake
from ctedge.edge.serve.logs import redact
from ctedge.edge.serve.spool import Spool, uid_hash
from ctedge.edge.study.rules import SeriesRules

log = logging.getLogger(__name__)
POLL_RETRIES = 3
MAX_STUDIES = 2000  # one poll's answer; more is refused (a day's CT studies fit)
SINCE = "poll.since"  # journal meta: the StudyDate the next poll asks from
FINAL = ("retrieved", "held", "not eligible")


def poll_source(text: str, ae_title: str, auth: dict, max_bytes: int, max_instances: int, timeout: float):
    """The PACS ``--poll`` names, as a pull source (DIMSE or DICOMweb) with the node's bounds."""
    from ctedge.edge.pacs import DicomWebSource, DimseSource, PullOptions

    options = PullOptions(max_studies=MAX_STUDIES, max_bytes=max_bytes, max_instances=max_instances,
                          timeout_s=timeout)
    if text.startswith("dicomweb:"):
        return DicomWebSource(text.removeprefix("dicomweb:"), options=options, **auth)
    return DimseSource(text, ae_title, options)


class Poller:
    """The poll loop's step, and what ``/readyz`` shows of it."""

    def __init__(self, spool: Spool, source, rules: SeriesRules, every: float, pause,
                 on_not_eligible: Callable[[], None] = lambda: None, since: str | None = None):
        self.spool, self.journal, self.source, self.rules = spool, spool.journal, source, rules
        self.since = since  # the first poll's StudyDate (YYYYMMDD); None: today
        self.every, self.pause, self.on_not_eligible = every, pause, on_not_eligible
        self.next_poll = 0.0
        self.last_poll: float | None = None
        self.last_error: str | None = None  # the last poll's, or a study's
        self.failing: str | None = None  # the last poll's query failed: why
        self.last_found = 0

    def step(self) -> float:
        """Poll when due; the seconds until the next look."""
        now = time.time()
        if self.pause.paused or now < self.next_poll:
            return min(max(self.next_poll - now, 0.05), 1.0)
        self.next_poll = now + self.every
        since = self.journal.meta(SINCE) or self.since or time.strftime("%Y%m%d", time.localtime(now))
        try:
            studies = self.source.find_studies({"StudyDate": f"{since}-", "ModalitiesInStudy": "CT"})
        except PullError as exc:
            self._failed(str(exc))
            return min(self.every, 1.0)
        self.last_poll, self.last_error, self.failing, self.last_found = now, None, None, len(studies)
        pending = [study.study_date for study in studies if self._pending_after(study)]
        # the next poll asks from today, or from the oldest study still to take (waiting, to retry)
        dates = [date for date in pending if re.fullmatch(r"\d{8}", date)] + [time.strftime("%Y%m%d",
                                                                                             time.localtime(now))]
        self.journal.set_meta(SINCE, min(dates))
        return min(self.every, 1.0)

    def _pending_after(self, study: StudyRef) -> bool:
        """Look at one study; whether it is still to be taken at a later poll."""
        if self.pause.paused:
            return True
        try:
            self._look_at(study)
        except Exception as exc:  # that study's problem (the journal, the disk); the others go on
            log.exception("polled study %s: not taken; looked at again at the next poll", uid_hash(study.study_uid))
            self.last_error = f"study {uid_hash(study.study_uid)}: {exc.__class__.__name__}"
            return True
        seen = self.journal.polled(study.study_uid)
        return seen is None or (seen.status not in FINAL and seen.attempts < POLL_RETRIES)

    def _failed(self, error: str) -> None:
        if error != self.failing:
            log.warning("poll of %s failed: %s; tried again every %g s", self.source.name, error, self.every)
        self.last_error = self.failing = error

    def _look_at(self, study: StudyRef) -> None:
        seen = self.journal.polled(study.study_uid)
        if seen is not None and (seen.status in FINAL or seen.attempts >= POLL_RETRIES):
            return
        if self.journal.study(study.study_uid) is not None:  # pushed or STOWed: not ours to take
            self.journal.poll_seen(study.study_uid, study.instances, "held")
            return
        if seen is None or seen.instances != study.instances:  # new, or still growing on the PACS
            self.journal.poll_seen(study.study_uid, study.instances, "waiting")
            return
        self._take(study)

    def _take(self, study: StudyRef) -> None:
        name = uid_hash(study.study_uid)
        try:
            candidates, rejected = choose_series(self.source.find_series(study), self.rules)
            if not candidates:
                self._not_eligible(study, rejected)
                return
            started = time.monotonic()
            kept = self._retrieve(study, candidates[0].series_uid)
        except PullError as exc:
            self.journal.poll_seen(study.study_uid, study.instances, "failed", str(exc), failed=True)
            log.warning("polled study %s: not retrieved (%s); try %d of %d", name, exc, (self.journal.polled(
                study.study_uid).attempts), POLL_RETRIES)
            return
        self.journal.poll_seen(study.study_uid, study.instances, "retrieved", candidates[0].series_uid)
        log.info("polled study %s: %d instance(s) of its best series retrieved and spooled in %.1f s, as if pushed",
                 name, kept, time.monotonic() - started)

    def _not_eligible(self, study: StudyRef, rejected) -> None:
        reasons = "; ".join(f"{r.description or r.series_uid}: {r.reason}" for r in rejected)
        result = StudyResult(input=self.source.describe(study), study_uid=study.study_uid,
                             patient_id=study.patient_id, accession_number=study.accession_number,
                             study_date=study.study_date, series_rejected=tuple(rejected),
                             not_eligible="no series meets the rules" + (f" ({reasons})" if reasons else ""))
        from ctedge.core.results import dumps

        self.journal.poll_seen(study.study_uid, study.instances, "not eligible", dumps(result.to_dict()))
        self.on_not_eligible()
        log.info("polled study %s: not eligible: %s; nothing retrieved", uid_hash(study.study_uid),
                 result.not_eligible)

    def _retrieve(self, study: StudyRef, series_uid: str) -> int:
        """The series into a temp folder under the spool, then each instance into the spool as one
        association's; PullError when the PACS does not return it as asked, or it is not all kept."""
        folder = self.spool.root / "uploads" / f"poll-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        key, outcomes = f"poll-{uuid.uuid4().hex}", []
        try:
            self.source.fetch_series(study, series_uid, folder)
            for path in sorted(Path(folder).iterdir()):
                outcomes.append(intake.keep(self.spool, path, key))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            refused = [o for o in outcomes if not o.kept]
            if len(refused) < len(outcomes):  # its studies: complete, or maybe not
                self.spool.association_closed(key, "refused" if refused else "released")
        if refused:
            raise PullError(f"{len(refused)} of {len(outcomes)} instance(s) not kept ({refused[0].reason})")
        return len(outcomes)

    def to_dict(self) -> dict:
        """For /readyz (no token) and the status page: errors redacted (UIDs hashed, no dates or values)."""
        return {"source": self.source.name, "every_s": self.every, "last_poll": self.last_poll,
                "last_found": self.last_found, "failing": self.failing and redact(self.failing),
                "last_error": self.last_error and redact(self.last_error), "next_poll": self.next_poll or None}
