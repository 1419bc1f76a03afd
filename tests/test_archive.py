"""An archive's answers without Ray: StudyResult as Arrow and back, the Parquet folder
(part files, a killed writer's leftovers, foreign files, resume bookkeeping), study
references (lists, URLs, stored studies fetched through pyarrow/fsspec) and
`evaluate --from-parquet`. The Ray runs themselves are in test_archive_ray.py."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.cli.archive import reference
from ctedge.core.errors import CtedgeError
from ctedge.core.results import StudyResult
from ctedge.edge.batch import (
    STUDY_SCHEMA,
    ParquetFolder,
    StudyScorer,
    read_references,
    result_from_row,
    results_table,
    score_archive,
)
from ctedge.edge.batch.archive import run_info
from ctedge.edge.batch.storage import RUN_KEY
from ctedge.edge.runtime import Classifier
from ctedge.edge.study import StudyOptions, predict_studies
from ctedge.evaluation.archive import evaluate_parquet, read_labels
from helpers import write_archive

runner = CliRunner()


def scored_parquet(model: Path, paths: list[Path], out: Path) -> list[StudyResult]:
    """What `predict --study --ray` leaves, written in-process: one part file per study."""
    clf = Classifier(model)
    results = predict_studies(clf, paths, StudyOptions())
    folder = ParquetFolder(str(out))
    folder.prepare()
    metadata = {RUN_KEY: json.dumps(run_info(clf, model, StudyOptions())).encode()}
    for result in results:
        folder.write(results_table([result], metadata))
    return results


def test_rows_read_back_as_the_study_results_they_were(tmp_path, model):
    assert STUDY_SCHEMA.names == StudyResult.keys()
    paths = write_archive(tmp_path, 2, zipped=1)
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 not a zip")
    results = scored_parquet(model, [*paths, tmp_path / "bad.zip"], tmp_path / "out.parquet")
    rows = ParquetFolder(str(tmp_path / "out.parquet")).read().to_pylist()
    back = {r.input: r for r in map(result_from_row, rows)}
    assert len(back) == 3 and back[str(tmp_path / "bad.zip")].error.startswith("unreadable zip archive")
    for result in results:
        assert back[result.input] == result  # every field: slices, attributes, timings, warnings
    assert results[0].slices and results[0].attributes and results[0].timings_s


def test_the_parquet_folder_refuses_a_file_and_foreign_parts_and_drops_a_killed_writers_temporary(tmp_path, model):
    (tmp_path / "file.parquet").write_text("x")
    with pytest.raises(CtedgeError, match="is a file"):
        ParquetFolder(str(tmp_path / "file.parquet")).prepare()
    out = tmp_path / "out.parquet"
    scored_parquet(model, write_archive(tmp_path, 1), out)
    torn = out / ".part-0123abcd-000007.parquet.tmp"  # kill -9 in the middle of a write
    torn.write_bytes(b"PAR1 half a file")
    folder = ParquetFolder(str(out))
    assert len(folder.parts()) == 1 and len(folder.read()) == 1  # readers never see it
    folder.prepare()
    assert not torn.exists()
    stored = ParquetFolder(f"memory://ctedge-{tmp_path.name}/out.parquet")  # a URL, through fsspec
    stored.prepare()
    stored.write(folder.read())
    assert stored.read().equals(folder.read())
    fsspec.filesystem("memory").rm(f"/ctedge-{tmp_path.name}", recursive=True)
    pq.write_table(pa.table({"input": ["x"], "probability": ["not a number"]}), out / "foreign.parquet")
    with pytest.raises(CtedgeError, match="not readable as ctedge's"):
        ParquetFolder(str(out)).read()


def test_a_rerun_scores_nothing_already_there_and_another_model_is_refused(tmp_path, model):
    paths = write_archive(tmp_path, 2)
    out = tmp_path / "out.parquet"
    scored_parquet(model, paths, out)
    run = score_archive(model, [str(p) for p in paths], str(out))  # nothing to do: Ray is not even started
    assert (run.skipped, run.scored, run.rows_written, run.parts_written, run.errors) == (2, 0, 0, 0, 0)
    from helpers import brightness_onnx

    other = brightness_onnx(tmp_path / "other.onnx", size=32, gain=0.2)
    with pytest.raises(CtedgeError, match="another model or other options .*model_sha256"):
        score_archive(other, [str(p) for p in paths], str(out))
    with pytest.raises(CtedgeError, match="another model or other options .*options"):
        score_archive(model, [str(p) for p in paths], str(out), StudyOptions(top_k=3))


def test_references_come_from_lists_and_the_command_line_as_typed(tmp_path):
    listing = tmp_path / "lists" / "studies.txt"
    listing.parent.mkdir()
    listing.write_text("# archive\n\n../a\n/abs/b.zip\ns3://bucket/c.zip\n../a\n")
    references, repeated = read_references([str(listing), str(tmp_path / "d")])
    assert references == [str(tmp_path / "a"), "/abs/b.zip", "s3://bucket/c.zip", str(tmp_path / "d")]
    assert repeated == 1
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00study")
    with pytest.raises(CtedgeError, match="bad.txt: not a UTF-8"):
        read_references([str(tmp_path / "bad.txt")])
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(CtedgeError, match="empty.txt: lists no study"):
        read_references([str(tmp_path / "empty.txt")])
    # typer's Path folds '//': the CLI restores what was typed
    assert reference(Path("s3://bucket/key.zip")) == "s3://bucket/key.zip"
    assert reference(Path("file:///data/study")) == "file:///data/study"
    assert reference(Path("studies/p1")) == "studies/p1"


def test_the_scorer_fetches_stored_studies_and_names_rows_after_them(tmp_path, model):
    paths = write_archive(tmp_path, 2, zipped=1)
    store = fsspec.filesystem("memory")
    root = f"/ctedge-{tmp_path.name}"
    store.put(str(paths[0]), f"{root}/p0", recursive=True)
    store.pipe(f"{root}/p1.zip", paths[1].read_bytes())
    urls = [f"memory:/{root}/p0", f"memory:/{root}/p1.zip", f"memory:/{root}/missing.zip"]
    try:
        table = StudyScorer(model)({"input": np.array([str(paths[0]), *urls], dtype=object)})
        small = StudyScorer(model, max_fetch_bytes=1000)({"input": np.array(urls[1:2], dtype=object)})
    finally:
        store.rm(root, recursive=True)
    rows = {r.input: r for r in map(result_from_row, table.to_pylist())}
    local, stored = rows[str(paths[0])], rows[urls[0]]
    assert abs(stored.probability - local.probability) < 1e-9 and stored.study_uid == local.study_uid
    assert all(s.source.startswith(urls[0] + "/") for s in stored.slices) and "fetch" in stored.timings_s
    assert rows[urls[1]].error is None and rows[urls[1]].top_slices[0].source.startswith(urls[1] + ":")
    assert rows[urls[2]].error == "no such file or folder"
    assert "above the 1,000-byte fetch budget" in small.column("error")[0].as_py()


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory, model):
    """Three patients per class as class folders, and the same studies scored into a Parquet."""
    root = tmp_path_factory.mktemp("archive-eval")
    paths = write_archive(root / "all", 6, zipped=2)
    for path in paths:
        truth = "CT_COVID" if int(path.stem[1:]) % 2 == 0 else "CT_NonCOVID"
        (root / "data" / truth).mkdir(parents=True, exist_ok=True)
        path.rename(root / "data" / truth / path.name)
    moved = sorted((root / "data").glob("*/*"))
    scored_parquet(model, moved, root / "out.parquet")
    (root / "labels.csv").write_text("input,label,note\n" + "".join(
        f"data/{p.parent.name}/{p.name},{1 if p.parent.name == 'CT_COVID' else 0},x\n" for p in moved))
    return root


def test_evaluate_from_parquet_gives_what_evaluate_study_gives(class_folders, model):
    root = class_folders
    study = runner.invoke(app, ["evaluate", str(model), str(root / "data"), "--study", "--resamples", "50",
                                "--out", str(root / "a"), "--json", str(root / "a.json")])
    archive = runner.invoke(app, ["evaluate", "--from-parquet", str(root / "out.parquet"), "--labels",
                                  str(root / "labels.csv"), "--resamples", "50", "--json", str(root / "b.json")])
    assert study.exit_code == 0, study.output
    assert archive.exit_code == 0, archive.output
    a, b = (json.loads((root / name).read_text()) for name in ("a.json", "b.json"))
    assert b["kind"] == "study_evaluation" and b["data"] == str(root / "out.parquet")
    for key in ("metrics", "confusion", "operating_points", "patients", "studies", "positive", "threshold"):
        assert a[key] == b[key], key
    assert b["out_dir"] == str(root / "eval-out") and (root / "eval-out" / "studies.csv").is_file()


@pytest.mark.parametrize("text, message", [
    ("study,label\n", r"labels.csv:1: the header must name one key column \(study_uid or input\) and label"),
    ("input,label\ndata/CT_COVID/p0,maybe\n", r"labels.csv:2: label 'maybe' is not CT_COVID, CT_NonCOVID, 1 or 0"),
    ("input,label\ndata/CT_COVID/p0,1\n\ndata/CT_COVID/p0,1\n", r"labels.csv:4: input .*p0 is labelled twice "
                                                                 r"\(first on line 2\)"),
    ("input,label\ndata/CT_COVID/p9,1\n", r"labels.csv:2: input .*p9 is not in .*out.parquet"),
    ("study_uid,label\n1.2.3,0\n", r"labels.csv:2: study_uid 1.2.3 is not in .*out.parquet"),
    ("input,label\ndata/CT_COVID/p0,1,extra\n", r"labels.csv:2: 3 cell\(s\), the header has 2"),
])
def test_a_bad_labels_file_is_refused_naming_file_and_line(class_folders, text, message):
    labels = class_folders / "bad" / "labels.csv"
    labels.parent.mkdir(exist_ok=True)
    (labels.parent / "data").mkdir(exist_ok=True)
    labels.write_text(text.replace("data/", "../data/"))
    with pytest.raises(CtedgeError, match=message):
        evaluate_parquet(str(class_folders / "out.parquet"), labels, class_folders / "bad" / "eval", resamples=10)


def test_labels_by_study_uid_or_class_name_and_the_cli_exits_2_on_a_bad_row(class_folders, tmp_path):
    key, labels = read_labels(_write(tmp_path / "l.csv", "\ufeffstudy_uid,label\n1.2.3,CT_NonCOVID\n4.5,CT_COVID\n"),
                              "CT_COVID", "CT_NonCOVID")
    assert key == "study_uid" and [(x.key, x.truth, x.line) for x in labels] == [("1.2.3", 0, 2), ("4.5", 1, 3)]
    result = runner.invoke(app, ["evaluate", "--from-parquet", str(class_folders / "out.parquet"), "--labels",
                                 str(_write(tmp_path / "x.csv", "input,label\nsomething,2\n")), "--out",
                                 str(tmp_path / "eval")])
    assert result.exit_code == 2 and "x.csv:2: label '2' is not" in result.output
    result = runner.invoke(app, ["evaluate", "--labels", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "--from-parquet takes --labels" in result.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
