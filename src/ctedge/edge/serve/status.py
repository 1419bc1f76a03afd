"""The plain-HTML page for the person who runs the box: the model, readiness, the last
answers and how their results went out (failed ones in red), errors. Read from the
journal; no patient data (study UIDs hashed)."""

from __future__ import annotations

import html
import json
import time

from ctedge.edge.serve import views
from ctedge.edge.serve.logs import redact
from ctedge.edge.serve.spool import uid_hash

REFRESH_S = 5
DELIVERY_STYLE = {"failed": ' class="failed"', "pending": ' class="pending"'}


def _row(line: views.AnswerLine) -> str:
    result = line.result
    cells = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line.created)), uid_hash(line.study_uid),
             f"v{line.version}", line.completion, str(result.get("slices_used", "")),
             "" if result.get("probability") is None else f"{result['probability']:.4f}",
             _label(result), f"{line.latency_s:.2f} s"]
    return ("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
            + f"<td{DELIVERY_STYLE.get(line.delivery, '')}>{html.escape(line.delivery)}</td></tr>")


def _label(result: dict) -> str:
    """The answer's label, or why there is none (redacted)."""
    status = views.answer_status(result)
    if status == "answered":
        return result.get("label") or ""
    return f"{status}: {redact(str(result.get('error') or result.get('not_eligible')))}"


def _polled(service) -> str:
    """With --poll: the poll's state and the studies it saw but did not take (not eligible, waiting, failing)."""
    if service.poller is None:
        return ""
    poll = service.poller.to_dict()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(poll["last_poll"])) if poll["last_poll"] else "never"
    state = f'<span class="failed">failing: {html.escape(poll["failing"])}</span>' if poll["failing"] \
        else f"{poll['last_found']} CT stud(ies) found"
    rows = "".join(
        f"<tr><td>{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row.checked))}</td>"
        f"<td>{uid_hash(row.study_uid)}</td><td>{html.escape(row.status)}</td>"
        f"<td>{html.escape(redact(_poll_reason(row)))}</td></tr>" for row in service.journal.recent_polled(20))
    return (f"<h2>Polled from {html.escape(poll['source'])}</h2><p>Every {poll['every_s']:g} s; last poll {when}: "
            f"{state}.</p><table><tr><th>time</th><th>study (hashed UID)</th><th>status</th><th>why</th></tr>"
            f"{rows or '<tr><td colspan=4>none left aside</td></tr>'}</table>")


def _poll_reason(row) -> str:
    if row.status == "not eligible":
        return json.loads(row.detail)["not_eligible"]
    return row.detail or views.POLL_WORDS.get(row.status, "")


def status_page(service, now: float) -> str:
    """The page, refreshed every few seconds."""
    clf, config = service.clf, service.config
    lines = views.recent_answers(service.journal, 50)
    rows = "".join(map(_row, lines)) or "<tr><td colspan=9>no study answered yet</td></tr>"
    errors = "".join(f"<li>{html.escape(redact(e))}</li>" for e in service.recent_errors()) or "<li>none</li>"
    counts = views.counts(service.journal)
    ready, readiness = service.readiness()
    state = "ready" if ready else "NOT READY: " + "; ".join(readiness["reasons"])
    failed = (f'<span class="failed">{counts["failed"]} result(s) failed</span> (tried again every '
              f'{config.retry_failed_every:g} s)' if counts["failed"] else "no result failed")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>ctedge serve</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.failed{{color:#fff;background:#c00}}
.pending{{background:#fe8}}</style></head>
<body><h1>ctedge serve</h1>
<p><b>{html.escape(state)}</b></p>
<p>Model <b>{html.escape(config.model.name)}</b> (sha256 {service.algorithm.sha256[:12]}…) on
{html.escape(clf.runtime)} {html.escape(clf.precision)}, threshold {clf.threshold:g}.
DICOM {html.escape(config.ae_title)} on port {config.dicom_port}; queue {service.worker.length()},
results pending {counts["pending"]}, {failed}, studies being received {counts["receiving"]}.</p>
<h2>Last studies</h2>
<table><tr><th>time</th><th>study (hashed UID)</th><th>answer</th><th>completion</th><th>slices used</th>
<th>probability</th><th>label</th><th>latency</th><th>result sent</th></tr>{rows}</table>
{_polled(service)}<h2>Errors</h2><ul>{errors}</ul>
<p><small>{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))} · <a href="/docs">API</a> ·
<a href="/metrics">metrics</a></small></p></body></html>"""
