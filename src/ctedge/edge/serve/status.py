"""The plain-HTML page for the person who runs the box: the model, the last answers, errors."""

from __future__ import annotations

import html
import time

from ctedge.edge.serve.logs import redact
from ctedge.edge.serve.spool import uid_hash

REFRESH_S = 5


def _row(record, destinations: bool) -> str:
    summary = record.summary
    cells = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.finished)), uid_hash(record.study_uid),
             f"v{record.version}", str(summary.get("slices_used", "")),
             "" if summary.get("probability") is None else f"{summary['probability']:.4f}",
             summary.get("label") or f"error: {redact(str(summary.get('error')))}", f"{record.latency_s:.2f} s",
             "-" if summary.get("error") else "yes" if record.sent else "not yet" if destinations else "no destination"]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def status_page(service, now: float) -> str:
    """The page; no patient data (study UIDs hashed), refreshed every few seconds."""
    clf, config = service.clf, service.config
    rows = "".join(_row(r, bool(config.destination)) for r in list(service.recent)) or "<tr><td colspan=8>no study answered yet</td></tr>"
    errors = "".join(f"<li>{html.escape(redact(e))}</li>" for e in list(service.errors)) or "<li>none</li>"
    receiving = sum(s.needs_answer() for s in service.spool.studies.values())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<title>ctedge serve</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}</style></head>
<body><h1>ctedge serve</h1>
<p>Model <b>{html.escape(config.model.name)}</b> (sha256 {service.algorithm.sha256[:12]}…) on
{html.escape(clf.runtime)} {html.escape(clf.precision)}, threshold {clf.threshold:g}.
DICOM {html.escape(config.ae_title)} on port {config.dicom_port}; queue {service.worker.length()},
results unsent {service.outbox.pending()}, studies being received {receiving}.</p>
<h2>Last studies</h2>
<table><tr><th>time</th><th>study (hashed UID)</th><th>answer</th><th>slices used</th><th>probability</th>
<th>label</th><th>latency</th><th>result sent</th></tr>{rows}</table>
<h2>Errors</h2><ul>{errors}</ul>
<p><small>{time.strftime("%H:%M:%S", time.localtime(now))} · <a href="/docs">API</a> ·
<a href="/metrics">metrics</a></small></p></body></html>"""
