import base64
import json
import shutil
from html.parser import HTMLParser

import cv2
import numpy as np
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.evaluation.report import verdict

runner = CliRunner()


class PageParser(HTMLParser):
    """Collects what a self-contained page must get right."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.headings, self.figures = [], [], [], 0
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.links.append(attrs[key])
        self.figures += tag == "figure"
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def parse(path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text())
    return parser


def assert_self_contained(page: PageParser) -> None:
    assert page.images and not page.links  # no stylesheet, script or link to fetch
    for src in page.images:
        header, data = src.split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
        assert cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR) is not None


def copy_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval-*", "report*", "audit.json"))
    return run


def test_report_is_one_self_contained_page_with_every_section(tmp_path, trained_run, phantom_data):
    run = copy_run(trained_run, tmp_path)
    result = runner.invoke(app, ["report", str(run), "--explain", "4", "--resamples", "20",
                                 "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    page = parse(run / "report.html")
    assert_self_contained(page)
    assert page.headings[:3] == ["Data and training", "Data audit", "Evaluation: val split"]
    assert page.headings[3].startswith("Where the model looked")
    summary = json.loads((tmp_path / "r.json").read_text())
    assert len(summary["explained"]) == 4 and summary["audit"]["balance"]["val"]["images"] > 0
    assert "metadata" in (run / "report.html").read_text()  # the verdict against the shortcut baseline
    metrics = run / "eval-val" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns

    result = runner.invoke(app, ["report", str(run), "--no-audit", "--explain", "0", "--resamples", "20",
                                 "-o", str(tmp_path / "b.html")])
    assert result.exit_code == 0, result.output
    assert metrics.stat().st_mtime_ns == stamp  # the evaluation was reused, not redone
    assert parse(tmp_path / "b.html").headings == ["Data and training", "Evaluation: val split"]
    result = runner.invoke(app, ["report", str(run), "--no-audit", "--explain", "0", "--resamples", "30"])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["reuse_key"]["resamples"] == 30  # other resamples: redone

    moved = shutil.copytree(phantom_data, tmp_path / "moved")
    result = runner.invoke(app, ["report", str(run), "--data", str(moved), "--no-audit", "--explain", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(metrics.read_text())["data"]["root"] == str(moved)  # other data: evaluated again

    result = runner.invoke(app, ["report", str(run), "--explain", "-1"])
    assert result.exit_code == 2 and "--explain" in result.stderr


def test_report_names_a_folder_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a training run folder or tuning project" in result.stderr
    assert "Traceback" not in result.output


def test_audit_and_evaluate_write_html_pages(tmp_path, trained_run, phantom_data):
    result = runner.invoke(app, ["audit", str(phantom_data), "--image-size", "48", "--html", str(tmp_path / "a.html")])
    assert result.exit_code == 0, result.output
    assert parse(tmp_path / "a.html").headings == ["Data audit"]
    result = runner.invoke(app, ["evaluate", str(trained_run / "model.keras"), str(phantom_data), "--resamples", "20",
                                 "-o", str(tmp_path / "e"), "--html", str(tmp_path / "e.html")])
    assert result.exit_code == 0, result.output
    page = parse(tmp_path / "e.html")
    assert page.headings == ["Evaluation: val split"]
    assert_self_contained(page)  # ROC and calibration plots inline


def test_verdict_puts_the_model_against_the_shortcut_and_leakage():
    from dataclasses import replace

    from ctedge.core.results import Estimate, ImageEvaluation

    evaluation = ImageEvaluation(
        model="m.keras", data={}, split="val", external=False, group_regex=None, split_drift={}, images=40,
        groups=None, skipped=[], dropped_annotated=[], threshold=0.5, positive=20,
        metrics={"auc": Estimate(value=0.80, ci95=(0.70, 0.88))}, operating_points={},
        confusion=[[15, 5], [5, 15]], ece=0.05, output_spread=0.6, shortcut_baseline={"auc": 0.75})
    assert 'class="verdict bad"' in verdict(evaluation, None)  # baseline inside the model's CI
    evaluation = replace(evaluation, shortcut_baseline={"auc": 0.60})
    assert 'class="verdict good"' in verdict(evaluation, None)
    leaking = {"leakage": True, "cross_split_duplicates": 3, "shortcut_baseline": {}}
    assert "Leakage: 3" in verdict(evaluation, leaking)
