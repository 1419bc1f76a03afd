import json
from pathlib import Path

from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.results import ImageEvaluation, StudyEvaluation

runner = CliRunner()


def test_train_writes_the_run_folder_and_skips_bad_files(trained):
    run = trained.run_dir
    for name in ("model.keras", "config.json", "history.csv", "training_curves.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["preprocess"]["image_size"] == 48
    assert config["model"]["backbone"] == "tiny"
    skipped = [u for part in config["splits"].values() for u in part["unreadable"]]
    assert [u["path"].endswith("junk.png") for u in skipped] == [True]
    assert "junk.png" in trained.stderr
    assert sum(len(files) for files in config["files"].values()) == 24
    assert config["result"]["images_per_s"] > 0
    assert trained.summary["result"] == config["result"]


def test_training_is_repeatable_with_a_seed(tmp_path, trained):
    """The session's run again, same command and seed, for its first epoch: the same loss. Run
    with --eager (no graph tracing), so it also holds eager mode to the graph run's numbers."""
    config = json.loads((trained.run_dir / "config.json").read_text())
    args = ["train", config["data"]["root"], "--backbone", "tiny", "--weights", "none", "--image-size", "48",
            "--epochs", "1", "--batch-size", "4", "--units", "8", "--lr", "1e-3", "--eager",
            "-o", str(tmp_path / "again")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    first, again = ((run / "history.csv").read_text().splitlines() for run in (trained.run_dir, tmp_path / "again"))
    i = first[0].split(",").index("loss")
    assert abs(float(first[1].split(",")[i]) - float(again[1].split(",")[i])) < 1e-4


def test_evaluate_prints_metrics_with_cis(tmp_path, trained_run, phantom_data):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(trained_run / "model.keras"), str(phantom_data),
                                 "--split", "all", "--resamples", "50", "-o", str(out),
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert list(report) == ImageEvaluation.keys()  # the --json is the typed report's schema, every key
    assert json.loads((out / "metrics.json").read_text()) == report
    assert report["images"] == 24
    for entry in report["metrics"].values():
        lo, hi = entry["ci95"]
        assert lo <= entry["value"] + 1e-9 and entry["value"] <= hi + 1e-9
    assert sum(map(sum, report["confusion"])) == 24
    assert (out / "roc.png").is_file() and (out / "calibration.png").is_file()
    assert "sensitivity" in result.stdout + result.stderr
    assert report["shortcut_baseline"] == {}  # only for val/test


def test_evaluate_puts_the_metadata_baseline_beside_the_model(tmp_path, trained_run, phantom_data):
    result = runner.invoke(app, ["evaluate", str(trained_run / "model.keras"), str(phantom_data),
                                 "--split", "test", "--resamples", "20", "-o", str(tmp_path / "e"),
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    baseline = report["shortcut_baseline"]
    assert 0.0 <= baseline["auc"] <= 1.0 and baseline["images"] == report["images"]
    fpr, tpr = baseline["roc"]["fpr"], baseline["roc"]["tpr"]  # drawn into roc.png beside the model's
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and fpr == sorted(fpr)
    assert "shortcut baseline" in result.stderr


def test_user_errors_get_a_message_and_exit_code_not_a_traceback(tmp_path, trained_run):
    result = runner.invoke(app, ["train", str(tmp_path / "missing"), "--weights", "none"])
    assert result.exit_code == 2
    assert "data folder not found" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none.keras"), str(tmp_path)])
    assert result.exit_code == 2 and "model not found" in result.stderr
    result = runner.invoke(app, ["evaluate", str(trained_run / "model.keras"), str(tmp_path),
                                 "--split", "bogus"])
    assert result.exit_code == 2 and "--split" in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--epochs", "1", "--backbone", "tiny",
                                 "--per-class", "10", "--eager", "--json", str(tmp_path / "demo.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo" / "run" / "model.keras").is_file()
    assert report["evaluation"]["split"] == "test" and "chance" in report["verdict"]


def test_evaluate_says_when_the_model_is_effectively_constant(tmp_path, phantom_data):
    import numpy as np

    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.model import ModelConfig, build_model

    model = build_model(ModelConfig(weights="none", backbone="tiny", units=4), PreprocessConfig(image_size=32))
    output = model.get_layer("head_output")
    output.set_weights([np.zeros_like(output.kernel.numpy()), np.array([0.3], np.float32)])
    model.save(tmp_path / "constant.keras")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "constant.keras"), str(phantom_data), "--split", "all",
                                 "--resamples", "10", "-o", str(tmp_path / "e"), "--html", str(tmp_path / "e.html")])
    assert result.exit_code == 0, result.output
    assert "effectively constant" in result.stderr
    assert "effectively constant" in (tmp_path / "e.html").read_text()


def test_demo_study_runs_the_whole_study_path(tmp_path):
    """`demo --study` at test size: DICOM patients -> slices -> train -> ONNX ->
    predict --study and patient-level evaluation on the held-out patients (one of
    them zipped); then `report --study` on the run."""
    demo = tmp_path / "d"
    result = runner.invoke(app, ["demo", "--study", "-o", str(demo), "--epochs", "1", "--backbone", "tiny",
                                 "--patients", "6", "--slices", "8", "--eager", "--json", str(tmp_path / "d.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d.json").read_text())
    evaluation = report["evaluation"]
    assert list(evaluation) == StudyEvaluation.keys()
    assert evaluation["unit"] == "study" and evaluation["failed"] == []
    assert (evaluation["studies"], evaluation["patients"], report["held_out_patients"]) == (6, 6, 6)
    assert sorted(p.name for p in (demo / "studies" / "test" / "CT_NonCOVID").iterdir()) == ["P0006", "P0007", "P0008.zip"]
    assert (demo / "run" / "model.onnx").is_file() and (demo / "run" / "eval-studies" / "studies.csv").is_file()
    assert [Path(r["plot"]).is_file() for r in report["predicted"]] == [True, True]
    slices = {cls: list((demo / "slices" / cls).glob("*.png")) for cls in ("CT_COVID", "CT_NonCOVID")}
    assert all(slices.values()) and len({p.stat().st_size for found in slices.values() for p in found}) == 1
    assert "chance" in report["verdict"] and "took" in result.stderr
    page = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(demo / "run"), "--study", "--data", str(demo / "studies" / "test"),
                                 "--no-audit", "--resamples", "20", "-o", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "whole studies, one answer per patient" in html and "P0008.zip" in html


def test_error_messages_keep_their_brackets(tmp_path):
    """Rich markup must not eat '[...]' in a message (paths, extras like ctedge[train])."""
    folder = tmp_path / "scans[old]"
    result = runner.invoke(app, ["train", str(folder / "missing"), "--weights", "none"])
    assert result.exit_code == 2 and "scans[old]" in result.stderr


def test_evaluate_on_another_data_set_scores_every_image_there(tmp_path, trained_run):
    from ctedge.core.phantoms import make_dataset

    other = make_dataset(tmp_path / "other", per_class=4, size=64, seed=7)  # no file the run trained on
    result = runner.invoke(app, ["evaluate", str(trained_run / "model.keras"), str(other), "--resamples", "10",
                                 "-o", str(tmp_path / "e"), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["external"] and report["split"] == "external" and report["images"] == 8
    assert report["shortcut_baseline"] == {} and "not the training data" in result.stderr


def test_evaluate_checks_the_split_by_content_and_groups_only_the_bootstrap(tmp_path, trained):
    import shutil

    import cv2

    data = shutil.copytree(trained.summary["data"]["root"], tmp_path / "data")  # the very data, moved
    val_file = Path(next(iter(trained.summary["files"]["val"])))
    changed = data / val_file.parent.name / val_file.name
    cv2.imwrite(str(changed), 255 - cv2.imread(str(changed)))  # same name, other content
    result = runner.invoke(app, ["evaluate", str(trained.run_dir / "model.keras"), str(data), "--resamples", "10",
                                 "--group-regex", r"phantom_(\d\d)", "-o", str(tmp_path / "e"),
                                 "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["split_drift"] == {"val": {"missing": 1, "new": 1}} and "not the one" in result.stderr
    assert report["images"] == len(trained.summary["files"]["val"])  # the same val images
    assert report["data"]["group_regex"] is None and report["group_regex"] == r"phantom_(\d\d)"


def test_a_config_json_that_is_not_a_run_configuration_is_named(tmp_path, trained_run, phantom_data):
    import shutil

    shutil.copy(trained_run / "model.keras", tmp_path / "model.keras")
    for text in ("{not json", "[1, 2]"):
        (tmp_path / "config.json").write_text(text)
        result = runner.invoke(app, ["evaluate", str(tmp_path / "model.keras"), str(phantom_data)])
        assert result.exit_code == 2 and str(tmp_path / "config.json") in result.stderr.replace("\n", "")
        assert "Traceback" not in result.output
