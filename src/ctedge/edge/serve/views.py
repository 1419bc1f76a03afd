"""What the HTTP API, the status page and the metrics show: read from the journal, never
from in-memory state."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ctedge.edge.serve.journal import Journal


def delivery_summary(statuses: list[str], has_result: bool) -> str:
    """One word for an answer's deliveries: sent, pending, failed, no destination, or none
    (an answer without an SR has nothing to send)."""
    if not has_result:
        return "none"
    if not statuses:
        return "no destination"
    for word in ("failed", "pending"):
        if word in statuses:
            return word
    return "sent"


def answer_status(result: dict) -> str:
    """``answered``, ``not eligible`` (no series the rules accept: no SR, not an error) or ``no answer``."""
    if result.get("error"):
        return "no answer"
    return "not eligible" if result.get("not_eligible") else "answered"


@dataclass(frozen=True)
class AnswerLine:
    """One row of the status page."""

    study_uid: str
    version: int
    instances: int
    created: float
    latency_s: float
    completion: str
    result: dict
    delivery: str


def recent_answers(journal: Journal, limit: int) -> list[AnswerLine]:
    rows = journal.rows(
        "SELECT a.id, s.study_uid, a.version, a.instances, a.created, a.latency_s, a.completion, a.result, "
        "a.sr IS NOT NULL FROM answers a JOIN studies s ON s.id=a.study_id ORDER BY a.created DESC LIMIT ?", (limit,))
    statuses: dict[int, list[str]] = {}
    if rows:
        marks = ",".join("?" * len(rows))
        for answer_id, status in journal.rows(f"SELECT answer_id, status FROM deliveries WHERE answer_id IN "
                                              f"({marks})", tuple(r[0] for r in rows)):
            statuses.setdefault(answer_id, []).append(status)
    return [AnswerLine(uid, version, instances, created, latency, completion, json.loads(result),
                       delivery_summary(statuses.get(answer_id, []), bool(has_sr)))
            for answer_id, uid, version, instances, created, latency, completion, result, has_sr in rows]


def counts(journal: Journal) -> dict[str, int]:
    """Deliveries pending and failed, studies being received."""
    by_status = dict(journal.rows("SELECT status, COUNT(*) FROM deliveries WHERE status != 'sent' GROUP BY status"))
    receiving = journal.value("SELECT COUNT(*) FROM studies WHERE instances > answered_instances")
    return {"pending": by_status.get("pending", 0), "failed": by_status.get("failed", 0), "receiving": receiving}


def study_view(journal: Journal, study_uid: str, waiting: dict[int, str]) -> tuple[int, dict | None]:
    """``GET /v1/studies/{uid}``: (HTTP status, document); 404 with None when never received.
    ``waiting``: study id -> why the assembler thinks it may be incomplete."""
    study = journal.study(study_uid)
    if study is None:
        return polled_view(journal, study_uid)
    arriving = {"instances": study.instances, "association": study.association_state,
                "may_be_incomplete": waiting.get(study.id), "last_error": study.last_error}
    if study.version == 0:
        return 202, {"study_uid": study_uid, "status": "receiving", **arriving}
    answer_id, instances, completion, reason, result, sr_uid, sc_error, created, latency = journal.rows(
        "SELECT id, instances, completion, completion_reason, result, sr_uid, sc_error, created, "
        "latency_s FROM answers WHERE study_id=? AND version=?", (study.id, study.version))[0]
    deliveries = [{"kind": kind, "destination": destination, "status": status, "attempts": attempts,
                   "last_error": last_error, "sent_at": sent_at}
                  for kind, destination, status, attempts, last_error, sent_at in journal.rows(
                      "SELECT kind, destination, status, attempts, last_error, sent_at FROM deliveries "
                      "WHERE answer_id=? ORDER BY kind, destination", (answer_id,))]
    delivery = delivery_summary([d["status"] for d in deliveries], sr_uid is not None)
    result = json.loads(result)
    document = {"study_uid": study_uid, "status": answer_status(result), "version": study.version,
                "instances": instances, "completion": completion, "completion_reason": reason,
                "sent": delivery == "sent", "delivery": delivery, "deliveries": deliveries, "sr_uid": sr_uid,
                "secondary_capture_error": sc_error, "answered_at": created, "latency_s": latency,
                "receiving": {**arriving, "instances": study.instances - instances}
                if study.instances > instances else None, "result": result}
    return 200, document


POLL_WORDS = {"waiting": "seen on the PACS by the poll; taken once it holds the same instances at two polls",
              "failed": "the poll could not retrieve it"}


def polled_view(journal: Journal, study_uid: str) -> tuple[int, dict | None]:
    """A study the poll saw but did not take into the spool: not eligible (its result says why,
    nothing retrieved), waiting (202), or failing to come; 404 when the poll never saw it either."""
    row = journal.polled(study_uid)
    if row is None:
        return 404, None
    polled = {"first_seen": row.first_seen, "checked": row.checked, "instances": row.instances,
              "attempts": row.attempts}
    if row.status == "not eligible":
        return 200, {"study_uid": study_uid, "status": "not eligible", "version": 0, "delivery": "none",
                     "sent": False, "deliveries": [], "polled": polled, "result": json.loads(row.detail)}
    if row.status == "waiting":
        return 202, {"study_uid": study_uid, "status": "waiting", "polled": {**polled, "why": POLL_WORDS["waiting"]}}
    return 200, {"study_uid": study_uid, "status": "no answer", "version": 0, "delivery": "none", "sent": False,
                 "deliveries": [], "polled": {**polled, "status": row.status, "last_error": row.detail},
                 "result": {"study_uid": study_uid, "error": f"{POLL_WORDS['failed']}: {row.detail}",
                            "not_eligible": None}}
