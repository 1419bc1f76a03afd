"""The typed run configuration: both writers, the old unversioned shapes, and
files it must refuse (naming them)."""

import dataclasses
import json

import pytest

from ctedge.core.errors import CtedgeError


def _types(config) -> dict:
    return {f.name: type(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name not in ("train", "tune")}


def test_train_and_tune_write_the_same_typed_config(trained_run, tuned):
    from ctedge.core.runconfig import SCHEMA_VERSION, RunConfig, TrainConfig, TuneResult

    run = RunConfig.load(trained_run / "model.keras")
    project = RunConfig.load(tuned[0] / "p" / "best_model.keras")
    assert (run.kind, project.kind) == ("train", "tune")
    assert run.schema_version == project.schema_version == SCHEMA_VERSION
    assert _types(run) == _types(project)
    assert isinstance(run.train, TrainConfig) and run.tune is None
    assert isinstance(project.tune, TuneResult) and project.train is None
    best = tuned[1]["best_hyperparameters"]
    assert project.tune.hyperparameters == best and project.learning_rate == best["learning_rate"]
    assert project.model.units == best["units"] and project.tune.best_score == tuned[1]["best_score"]
    assert run.learning_rate == run.train.learning_rate and run.classes == project.classes
    for config in (run, project):  # file hashes per split, as many as the split has images
        assert config.files.keys() == config.splits.keys()
        assert len(config.files["val"]) == config.splits["val"]["images"] > 0


def _old_shapes(trained_run, tuned) -> tuple[dict, dict]:
    """config.json as train and tune wrote it before schema_version."""
    new = json.loads((trained_run / "config.json").read_text())
    train = {k: new[k] for k in ("ctedge_version", "created", "data", "train", "model", "preprocess", "classes",
                                 "positive", "splits", "files", "result")}
    hp = {"units": 16, "learning_rate": 0.003, "dropout": 0.1}
    tune = {"data": new["data"], "model": {**new["model"], **hp}, "preprocess": new["preprocess"],
            "classes": new["classes"], "positive": new["positive"], "hyperparameters": hp,
            "splits": new["splits"]}
    return train, tune


def test_old_unversioned_configs_are_read_as_version_0(tmp_path, trained_run, tuned):
    from ctedge.core.runconfig import RunConfig

    train, tune = _old_shapes(trained_run, tuned)
    (tmp_path / "config.json").write_text(json.dumps(train))
    run = RunConfig.load(tmp_path / "model.keras")
    assert run.kind == "train" and run.train.epochs == train["train"]["epochs"]
    assert run.files == train["files"] and run.data.root == train["data"]["root"]
    (tmp_path / "config.json").write_text(json.dumps(tune))
    project = RunConfig.load(tmp_path / "best_model.keras")
    assert project.kind == "tune" and project.learning_rate == 0.003 and project.model.units == 16
    assert project.model.dropout == 0.1 and project.ctedge_version is None and project.files == {}


@pytest.mark.parametrize("content, message", [
    ({"schema_version": 99, "kind": "train"}, "version 99 is newer"),
    ({"name": "some other tool", "data": [1]}, "not a ctedge run configuration"),
    ({"schema_version": 1, "kind": "predict"}, "not a ctedge run configuration"),
    ({"schema_version": "1"}, "schema_version must be a whole number"),
    ({"data": {}, "model": {}, "preprocess": {}, "train": {}, "classes": ["a"]}, "two class folder names"),
])
def test_newer_or_foreign_configs_are_refused_naming_the_file(tmp_path, content, message):
    from ctedge.core.runconfig import RunConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CtedgeError, match=message) as refused:
        RunConfig.load(tmp_path / "model.keras")
    assert str(path) in str(refused.value) and refused.value.exit_code == 2


def test_a_config_with_unknown_settings_is_refused(tmp_path, trained_run):
    from ctedge.core.runconfig import RunConfig

    config = json.loads((trained_run / "config.json").read_text())
    config["train"]["momentum"] = 0.9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CtedgeError, match="unknown or missing settings.*momentum"):
        RunConfig.load(tmp_path / "model.keras")


def test_save_then_load_gives_the_same_config(tmp_path, trained_run):
    from ctedge.core.runconfig import RunConfig

    run = RunConfig.load(trained_run / "model.keras")
    run.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == run


def test_the_pixel_budget_is_not_a_setting_of_the_run(tmp_path, trained_run):
    """A run trained with a raised --max-pixels does not carry it to the machine that
    reads its data later: config.json leaves the budget out, and the data options
    rebuilt from it take the reader's own."""
    from ctedge.core.runconfig import RunConfig, data_options_for

    run = RunConfig.load(trained_run / "model.keras")
    roomy = dataclasses.replace(run, data=dataclasses.replace(run.data, max_pixels=10**9))
    roomy.save(tmp_path / "config.json")
    assert "max_pixels" not in json.loads((tmp_path / "config.json").read_text())["data"]
    assert data_options_for(roomy, tmp_path).max_pixels == 50_000_000
    assert data_options_for(roomy, tmp_path, max_pixels=1000).max_pixels == 1000
