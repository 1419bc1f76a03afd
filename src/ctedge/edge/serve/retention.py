"""Retention (``--keep-days``, ``--max-spool``): the retention loop deletes studies the node
is done with — answered, every result sent, nothing arriving — oldest first, rows first
(one transaction), then their folder. A kill -9 between the two leaves an orphan folder,
removed at the next start. Studies still waiting for an answer or a delivery are kept
whatever their age or size: the spool may then stay over ``--max-spool`` (said in the log).
"""

from __future__ import annotations

import logging
import time

from ctedge.edge.serve.spool import Spool, uid_hash

log = logging.getLogger(__name__)
DAY_S = 86400.0


class Retention:
    """The retention loop's step."""

    def __init__(self, spool: Spool, keep_days: float | None, max_spool: int | None, every: float):
        self.spool, self.keep_days, self.max_spool, self.every = spool, keep_days, max_spool, every
        self.warned_over = False

    def step(self) -> float:
        if self.keep_days is None and self.max_spool is None:
            return self.every
        journal = self.spool.journal
        total = journal.value("SELECT COALESCE(SUM(bytes), 0) FROM studies")
        oldest_kept = time.time() - self.keep_days * DAY_S if self.keep_days is not None else None
        deleted = freed = 0
        for study_id, key, last_arrival, size in journal.finished_studies():
            old = oldest_kept is not None and last_arrival < oldest_kept
            over = self.max_spool is not None and total - freed > self.max_spool
            if not (old or over):
                break  # oldest first: the rest are newer and the spool is under its size
            study_uid = journal.value("SELECT study_uid FROM studies WHERE id=?", (study_id,))
            if study_uid is not None and self.spool.remove(study_id, study_uid, key):
                deleted, freed = deleted + 1, freed + size
                log.debug("retention: study %s deleted", uid_hash(study_uid))
        if deleted:
            log.info("retention: %d stud(ies) deleted (%.1f MB)", deleted, freed / 1e6)
        over = self.max_spool is not None and total - freed > self.max_spool
        if over and not self.warned_over:
            log.warning("spool holds %.1f MB, over --max-spool %.1f MB: the rest is not answered or not sent yet",
                        (total - freed) / 1e6, self.max_spool / 1e6)
        self.warned_over = over
        return self.every
