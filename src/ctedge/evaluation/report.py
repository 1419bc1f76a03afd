"""One self-contained HTML page for a run: data, audit, metrics, plots, Grad-CAM.

Everything is inline (CSS, pictures as base64 data URIs), so the page can be
mailed or attached to a ticket and opened anywhere without the run folder.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ctedge import __version__
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.files import atomic_write, file_digest
from ctedge.core.imageio import DEFAULT_MAX_PIXELS, read_image
from ctedge.core.metrics import DEFAULT_RESAMPLES, DEFAULT_THRESHOLD, constant_message
from ctedge.core.progress import ProgressFn
from ctedge.core.results import ImageEvaluation, Record, Scores, StudyEvaluation, evaluation_from_dict, save_json
from ctedge.evaluation.audit import shortcut_is_loud

if TYPE_CHECKING:
    from ctedge.core.runconfig import RunConfig

CSS = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 10px;border-bottom:1px solid #d8dbe2;padding-bottom:4px}
.sub{color:#5b6475;font-size:13px}
section{background:#fff;border-radius:8px;padding:4px 18px 14px;margin:14px 0;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 10px;border-bottom:1px solid #eceef2;text-align:right}
td:first-child,th:first-child,.kv td{text-align:left}th{background:#f0f2f5}
.verdict{padding:10px 14px;border-radius:6px;margin:10px 0;font-weight:600}
.bad{background:#fde8e8;border-left:5px solid #c81e1e}.warn{background:#fdf6e3;border-left:5px solid #c27c0e}
.good{background:#e7f6ec;border-left:5px solid #1e7e34}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:100%;border:1px solid #eceef2}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
figure{margin:0;background:#fafbfc;border:1px solid #eceef2;border-radius:6px;padding:6px}
figure img{width:100%;display:block}figcaption{font-size:12px;color:#3c4454;word-break:break-all}
.pair{display:flex;gap:4px;align-items:flex-start}.pair img{width:calc(50% - 2px)}
.cm td{width:90px;text-align:center;font-weight:600}
code{font-size:13px;background:#f0f2f5;padding:1px 4px;border-radius:3px}
"""


def _e(value) -> str:
    return html.escape(str(value))


def picture(path: str | Path, alt: str, max_side: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """An ``<img>`` holding the file itself (PNG), or a JPEG thumbnail of an image file
    (read within ``max_pixels``)."""
    path = Path(path)
    if max_side is None:
        data, mime = path.read_bytes(), "image/png"
    else:
        try:
            decoded = read_image(path, max_pixels=max_pixels)
        except UnreadableImage:
            return f"<span class=sub>({_e(path.name)}: unreadable)</span>"
        image = decoded.colour if decoded.colour is not None else np.clip(decoded.gray, 0, 255).astype(np.uint8)
        scale = min(1.0, max_side / max(image.shape[:2]))
        if scale < 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        data, mime = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes(), "image/jpeg"
    return f'<img alt="{_e(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><tr>{head}</tr>{body}</table>'


def verdict(evaluation: Scores | None, audit: dict | None) -> str:
    """The one paragraph a reader must see first: leakage, and the model against
    the metadata shortcut."""
    lines = []
    if audit and audit.get("leakage") and isinstance(evaluation, StudyEvaluation):
        lines.append(("bad", f"Leakage in the training data: {audit['cross_split_duplicates']} near-duplicate "
                             "pair(s) span the run's splits, so its validation figures are inflated; the studies "
                             "scored below are not part of that audit."))
    elif audit and audit.get("leakage"):
        lines.append(("bad", f"Leakage: {audit['cross_split_duplicates']} near-duplicate pair(s) "
                             "span splits, so held-out figures are inflated."))
    spread = evaluation.output_spread if evaluation else None
    constant = evaluation and constant_message(float("nan") if spread is None else spread, evaluation.scored)
    if constant:
        lines.append(("bad", constant[0].upper() + constant[1:] + "."))
    if evaluation:
        auc = evaluation.metrics["auc"]
        lo, hi = auc.ci95
        base = evaluation.shortcut_baseline.get("auc")
        model_text = (f"model AUC {_figure(auc.value)} (95% CI {_figure(lo)}-{_figure(hi)}) "
                      f"on {evaluation.split}")
        if base is None or lo is None:
            lines.append(("warn", f"{model_text}; no metadata baseline on this split to read it against."))
        elif base >= lo:
            lines.append(("bad", f"{model_text} does not clearly beat a classifier that sees only file "
                                 f"metadata (AUC {base:.3f}): its figures may reflect how the images were "
                                 "collected, not the lungs."))
        else:
            lines.append(("good", f"{model_text}, above the metadata-only shortcut baseline "
                                  f"(AUC {base:.3f})."))
    elif audit:
        for split, b in audit["shortcut_baseline"].items():
            if isinstance(b, dict) and shortcut_is_loud(b):
                lines.append(("warn", f"File metadata alone reaches AUC {b['auc']:.3f} on {split}: read any "
                                      "image model's figures against this shortcut."))
    return "".join(f'<div class="verdict {kind}">{_e(text)}</div>' for kind, text in lines)


def training_section(config: RunConfig, run_dir: Path) -> str:
    """Split counts and settings of a training run, or of a tuning project
    (then with its trial table from ``summary.json``)."""
    rows = [[name, s["images"], s["positive"], s["negative"], len(s["dropped"]), len(s["unreadable"])]
            for name, s in config.splits.items() if s["images"] or s["dropped"] or s["unreadable"]]
    pre, result = config.preprocess, config.result
    settings = [["data", config.data.root], ["classes", ", ".join(config.classes)],
                ["positive class", config.positive], ["backbone weights", config.model.weights],
                ["head width", config.model.units], ["image size", pre.image_size],
                ["HU window", f"{pre.window_low} to {pre.window_high}"],
                ["epochs run", result.get("epochs_run")],
                ["learning rate", config.learning_rate], ["batch size", config.batch_size],
                ["training time", f"{result['seconds']:.0f} s" if "seconds" in result else None]]
    out = ["<h2>Data and training</h2>",
           _table(["split", "images", "positive", "negative", "dropped (annotated)", "unreadable"], rows),
           _table(["setting", "value"], [row for row in settings if row[1] is not None], "kv")]
    curves, summary = run_dir / "training_curves.png", run_dir / "summary.json"
    if curves.is_file():
        out.append(f'<div class="plots">{picture(curves, "training curves")}</div>')
    if summary.is_file():
        tuned = json.loads(summary.read_text())
        out.append(f"<p><b>Tuning</b> ({_e(tuned['mode'])}, {_e(tuned['algorithm'])}, objective "
                   f"{_e(tuned['objective'])}; best model: {_e(tuned['best_model_source'])})</p>")
        out.append(_table(["trial", "units", "learning rate", "dropout", "score", "seconds", "status"],
                          [[t["trial"], t["units"], f"{t['learning_rate']:.2g}", t["dropout"],
                            "-" if t["score"] is None else f"{t['score']:.4f}",
                            "-" if t["seconds"] is None else f"{t['seconds']:.1f}", t["status"]]
                           for t in tuned["trials"]]))
    return "".join(out)


def audit_section(audit: dict, show: int = 6, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    pairs = audit["near_duplicates"]
    balance = [[s, b["images"], b["positive"], f"{b['positive'] / b['images']:.0%}" if b["images"] else "-"]
               for s, b in audit["balance"].items()]
    out = ["<h2>Data audit</h2>", _table(["split", "images", "positive", "share"], balance),
           f"<p><b>Near-duplicates</b>: {len(pairs)} pair(s), <b>{audit['cross_split_duplicates']}</b> across "
           f"splits (pHash within {audit['hash_threshold_bits']} bits, confirmed by ORB keypoints).</p>"]
    if pairs:
        out.append('<div class="grid">')
        for p in pairs[:show]:
            tag = "ACROSS SPLITS" if p["cross_split"] else f"within {p['splits'][0]}"
            out.append(f'<figure><div class="pair">{picture(p["a"], "a", 240, max_pixels)}{picture(p["b"], "b", 240, max_pixels)}</div>'
                       f"<figcaption>{_e(tag)}, {p['bits']} bits: {_e(Path(p['a']).name)} ~ "
                       f"{_e(Path(p['b']).name)}</figcaption></figure>")
        out.append("</div>")
        if len(pairs) > show:
            out.append(f"<p class=sub>... and {len(pairs) - show} more pair(s) in the audit JSON.</p>")
    annotated = audit["annotated"]
    out.append(f"<p><b>Annotated images</b> (coloured marks): {len(annotated)}</p>")
    if annotated:
        out.append('<div class="grid">' + "".join(
            f"<figure>{picture(a, 'annotated', 240, max_pixels)}<figcaption>{_e(Path(a).name)}</figcaption></figure>"
            for a in annotated[:show]) + "</div>")
    baseline = audit["shortcut_baseline"]
    rows = [[s, baseline[s]["images"], f"{baseline[s]['auc']:.3f}", f"{baseline[s]['accuracy']:.3f}"]
            for s in ("val", "test") if s in baseline]
    out.append("<p><b>Shortcut baseline</b>: a random forest on file metadata alone (height, width, aspect, "
               "channels, format, bytes per pixel), trained on the training part.</p>")
    out.append(_table(["split", "images", "AUC", "accuracy"], rows) if rows
               else f"<p class=sub>{_e(baseline.get('note', 'no val/test part to score'))}</p>")
    out.append(f"<p>Unreadable: {len(audit['unreadable'])}; smaller than the model input: "
               f"{len(audit['too_small'])}.</p>")
    return "".join(out)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def evaluation_section(evaluation: ImageEvaluation | StudyEvaluation) -> str:
    rows = [[name, _figure(m.value), f"{_figure(m.ci95[0])} - {_figure(m.ci95[1])}"]
            for name, m in evaluation.metrics.items()]
    (tn, fp), (fn, tp) = evaluation.confusion
    shade = max(tn, fp, fn, tp) or 1

    def cell(n: int, good: bool) -> str:
        colour = (30, 126, 52) if good else (200, 30, 30)
        return f'<td style="background:rgba{(*colour, round(0.1 + 0.5 * n / shade, 2))}">{n}</td>'

    confusion = ('<table class="cm"><tr><th></th><th>predicted negative</th><th>predicted positive</th></tr>'
                 f"<tr><th>negative</th>{cell(tn, True)}{cell(fp, False)}</tr>"
                 f"<tr><th>positive</th>{cell(fn, False)}{cell(tp, True)}</tr></table>")
    points = [[name.replace("_", " "), f"{value:.3f}"] for name, value in evaluation.operating_points.items()]
    plots = "".join(picture(path, name) for name, path in (("roc_png", evaluation.roc_png),
                                                           ("calibration_png", evaluation.calibration_png))
                    if path and Path(path).is_file())
    if isinstance(evaluation, StudyEvaluation):
        title = "Evaluation: whole studies, one answer per patient"
        counts = f"{evaluation.studies} studies of {evaluation.patients} patients"
        resampled = "patients resampled"
        failed = evaluation.failed
        if failed:
            counts += (f" ({len(failed)} more got no answer and are not scored: "
                       + "; ".join(f"{f['input']}: {f['error']}" for f in failed) + ")")
    else:
        title = f"Evaluation: {evaluation.split} split"
        counts = f"{evaluation.images} images"
        resampled = f"{evaluation.groups} groups resampled" if evaluation.groups else "images resampled"
    return (f"<h2>{_e(title)}</h2>"
            f"<p>{_e(counts)}, {evaluation.positive} positive; threshold "
            f"{evaluation.threshold}; bootstrap 95% CIs ({_e(resampled)}); "
            f"ECE {_figure(evaluation.ece)}.</p>"
            f'<div class="plots"><div>{_table(["metric", "value", "95% CI"], rows)}{confusion}'
            f'{_table(["operating point", "value"], points)}</div>{plots}</div>')


def explain_section(rows: list[dict], labels: dict[str, int], positive: str,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    figures = []
    order = {"TP": 0, "TN": 1, "FP": 2, "FN": 3, "": 4}
    for row in rows:
        if row.get("error"):
            continue
        truth = labels.get(row["path"])
        said = row["probability"] >= row.get("threshold", DEFAULT_THRESHOLD)
        kind = "" if truth is None else ("TP" if truth and said else "FN" if truth else "FP" if said else "TN")
        figures.append((order[kind], f"<figure>{picture(row['overlay'], 'Grad-CAM', 400, max_pixels)}<figcaption><b>{kind}</b> "
                       f"P({_e(positive)}) {row['probability']:.3f} · {_e(Path(row['path']).name)}"
                       "</figcaption></figure>"))
    figures.sort(key=lambda f: f[0])
    return ("<h2>Where the model looked (Grad-CAM, positive class)</h2>"
            "<p class=sub>Red: evidence for the positive class. TP/FP/FN/TN against the true label; "
            "the most confident of each kind are shown.</p>"
            f'<div class="grid">{"".join(f for _, f in figures)}</div>')


def page(title: str, sections: list[str], subtitle: str = "") -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    byline = " · ".join(filter(None, [subtitle, f"ctedge {__version__}", stamp]))
    body = "".join(f"<section>{s}</section>" for s in sections if s)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><div class=sub>{_e(byline)}</div>"
            f"{body}</main></body></html>")


def write_page(path: str | Path, title: str, sections: list[str], subtitle: str = "") -> Path:
    path = Path(path)
    atomic_write(page(title, sections, subtitle).encode(), path)
    return path


def pick_for_explaining(predictions_csv: Path, count: int, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[str, int]]:
    """The most confident true/false positives/negatives, in turn, up to ``count``."""
    with open(predictions_csv) as f:
        rows = [(r["path"], int(r["label"]), float(r["probability"])) for r in csv.DictReader(f)]
    kinds = {
        "FN": sorted((r for r in rows if r[1] and r[2] < threshold), key=lambda r: r[2]),
        "FP": sorted((r for r in rows if not r[1] and r[2] >= threshold), key=lambda r: -r[2]),
        "TP": sorted((r for r in rows if r[1] and r[2] >= threshold), key=lambda r: -r[2]),
        "TN": sorted((r for r in rows if not r[1] and r[2] < threshold), key=lambda r: r[2]),
    }
    picked: list[tuple[str, int]] = []
    while len(picked) < count and any(kinds.values()):
        for queue in kinds.values():
            if queue and len(picked) < count:
                path, label, _ = queue.pop(0)
                picked.append((path, label))
    return picked


def _cached(path: Path, make, key: dict, fresh: bool = False) -> dict:
    """JSON at ``path`` if a previous step wrote it with the same ``key`` (and not
    ``fresh``), else ``make()`` (a dict or a typed result), saved with its key."""
    key = json.loads(json.dumps(key, default=str))
    if path.is_file() and not fresh:
        stored = json.loads(path.read_text())
        if stored.get("reuse_key") == key:
            return stored
    made = make()
    result = {**(made.to_dict() if isinstance(made, Record) else made), "reuse_key": key}
    save_json(result, path)
    return result


def studies_section(evaluation: StudyEvaluation) -> str:
    """One row per study of a patient-level evaluation (from its studies.csv)."""
    path = Path(evaluation.out_dir) / "studies.csv" if evaluation.out_dir else None
    path = path if path and path.is_file() else Path(evaluation.studies_csv or "")
    if not path.is_file():
        return ""
    with open(path) as f:
        rows = [[r["input"], r["class"], r["probability"] and f"{float(r['probability']):.3f}",
                 r["label"] or "-", f"{r['slices_used']}/{r['slices_total']}", r["error"] or ""]
                for r in csv.DictReader(f)]
    return ("<h2>Studies</h2>" + _table(["study", "class", "probability", "label", "slices used/total", "error"],
                                        rows))


def _moved_to(evaluation: ImageEvaluation | StudyEvaluation, eval_dir: Path):
    """``evaluation`` with its folder and plots where they are now (the run folder may have moved)."""
    plots = {key: str(eval_dir / f"{key[:-4]}.png") for key in ("roc_png", "calibration_png")
             if (eval_dir / f"{key[:-4]}.png").is_file()}
    return replace(evaluation, out_dir=str(eval_dir), **plots)


def _study_evaluation(run_dir: Path, model: Path, onnx: str | Path | None, root: Path, resamples: int,
                      fresh: bool, max_pixels: int) -> tuple[dict, Path]:
    """``eval-studies/metrics.json`` of the exported model on the studies in ``root``, and its folder."""
    from ctedge.edge.study import StudyOptions
    from ctedge.evaluation.evaluate import evaluate_studies

    onnx = Path(onnx or run_dir / "model.onnx")
    if not onnx.is_file():
        raise CtedgeError(f"{onnx}: no exported model; studies are scored with the ONNX model `predict --study` "
                          f"runs (`ctedge export {model} --onnx -o {onnx}`, or pass --onnx)")
    eval_dir = run_dir / "eval-studies"
    # reused only for this very ONNX model (by content), data, resamples and pixel budget
    stored = _cached(eval_dir / "metrics.json", lambda: evaluate_studies(
        onnx, root, out_dir=eval_dir, resamples=resamples, options=StudyOptions(max_pixels=max_pixels)),
        {"model_sha256": file_digest(onnx), "data": str(root), "resamples": resamples, "max_pixels": max_pixels},
        fresh)
    return stored, eval_dir


def build(run_dir: str | Path, data: str | Path | None = None, split: str = "val",
          explain_count: int = 12, run_audit: bool = True, out: str | Path | None = None,
          resamples: int = DEFAULT_RESAMPLES, fresh: bool = False, study: bool = False,
          onnx: str | Path | None = None, progress: ProgressFn | None = None,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """The report of a training run folder or tuning project. ``eval-SPLIT/metrics.json``
    (``ctedge evaluate``) and ``audit.json`` are reused when made from the same
    data folder, unless ``fresh``, else made; the most confident right and wrong calls are explained into
    ``report-explained/``.

    With ``study``, ``data`` holds class folders of studies: the evaluation is
    patient-level, of the exported ``onnx`` model (default RUN_DIR/model.onnx),
    in ``eval-studies/``; the audit covers the run's own (slice) training data;
    no Grad-CAM (it needs slice images and the .keras model). ``progress`` hears each step;
    every image and slice is read within ``max_pixels``."""
    from ctedge.core.runconfig import RunConfig
    from ctedge.evaluation.evaluate import evaluate

    run_dir = Path(run_dir)
    model = next((run_dir / name for name in ("model.keras", "best_model.keras") if (run_dir / name).is_file()),
                 run_dir / "model.keras")
    config = RunConfig.load(model)
    if config is None or not model.is_file():
        raise CtedgeError(f"{run_dir}: not a training run folder or tuning project (no config.json and "
                          "model.keras or best_model.keras; `ctedge train` and `ctedge tune` write them)")
    if explain_count < 0:
        raise CtedgeError(f"must be 0 or more, not {explain_count}", param="explain_count")
    if study and data is None:
        raise CtedgeError("is needed with study: a folder of class folders holding one study per patient", param="data")
    root = Path(data or config.data.root)
    if not root.is_dir():
        hint = "" if data else " (the run was trained on it; pass --data)"
        raise CtedgeError(f"data folder not found: {root}{hint}")
    settings = {k: v for k, v in config.to_dict()["data"].items() if k != "root"}
    if study:
        stored, eval_dir = _study_evaluation(run_dir, model, onnx, root, resamples, fresh, max_pixels)
        explain_count = 0
        root = Path(config.data.root)  # the audit is of the training data
        run_audit = run_audit and root.is_dir()
    else:
        eval_dir = run_dir / f"eval-{split}"
        # reused only for this very model (by content), data, split settings, resamples and threshold
        stored = _cached(eval_dir / "metrics.json",
                             lambda: evaluate(model, root, split, out_dir=eval_dir, resamples=resamples,
                                              progress=progress, max_pixels=max_pixels),
                             {"model_sha256": file_digest(model), "data": str(root), "split": split,
                              "split_settings": settings, "resamples": resamples, "threshold": DEFAULT_THRESHOLD,
                              "max_pixels": max_pixels}, fresh)
    evaluation = _moved_to(evaluation_from_dict(stored), eval_dir)
    audit = None
    if run_audit:
        from ctedge.evaluation.audit import audit as audit_data

        options = replace(config.data, root=str(root), max_pixels=max_pixels)
        audit = _cached(run_dir / "audit.json", lambda: audit_data(options, config.preprocess.image_size, progress=progress),
                        {"data": str(root), "split_settings": settings,
                         "image_size": config.preprocess.image_size, "max_pixels": max_pixels}, fresh)
    explained: list[dict] = []
    labels: dict[str, int] = {}
    if explain_count:
        from ctedge.evaluation.explain import explain

        picked = pick_for_explaining(eval_dir / "predictions.csv", explain_count, evaluation.threshold)
        labels = dict(picked)
        result = explain(model, [Path(p) for p, _ in picked], run_dir / "report-explained",
                         evaluation.threshold, config.positive or "positive", sheet=False, progress=progress,
                         max_pixels=max_pixels)
        explained = [e.to_dict() | {"threshold": evaluation.threshold} for e in result["explanations"]]
    sections = [verdict(evaluation, audit), training_section(config, run_dir),
                audit_section(audit, max_pixels=max_pixels) if audit else "", evaluation_section(evaluation),
                studies_section(evaluation) if study else "",
                explain_section(explained, labels, config.positive or "positive", max_pixels) if explained else ""]
    target = write_page(out or run_dir / "report.html", f"ctedge report: {run_dir.name}", sections,
                        f"model {model}")
    return {"report": str(target), "evaluation": evaluation, "audit": audit, "explained": explained}
