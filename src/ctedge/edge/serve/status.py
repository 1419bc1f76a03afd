"""The plain-HTML page for the person who runs the box: the model, readiness, the last
answers and how their results went out (failed ones in red), errors. Read from the
journal; no patient data (study UIDs hashed)."""

from __future__ import annotations

import html
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
<h2>Errors</h2><ul>{errors}</ul>
<p><small>{time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))} · <a href="/docs">API</a> ·
<a href="/metrics">metrics</a></small></p></body></html>"""
