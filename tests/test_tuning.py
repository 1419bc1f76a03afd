import json

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from helpers import tune_args

runner = CliRunner()


def test_search_runs_the_papers_defaults_first_and_saves_the_best_model(tuned):
    directory, summary = tuned
    assert summary["mode"] == "cached" and len(summary["trials"]) == 2
    first = next(t for t in summary["trials"] if t["trial"] == "0")
    assert (first["units"], first["learning_rate"]) == (256, 5e-5)
    assert all(t["status"] == "COMPLETED" and t["seconds"] > 0 for t in summary["trials"])
    assert (directory / "p" / "best_model.keras").is_file()
    assert json.loads((directory / "p" / "summary.json").read_text())["trials"] == summary["trials"]


def test_assembled_model_predicts_what_the_cached_head_did(tuned):
    from ctedge.core.metrics import roc_auc
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.runconfig import RunConfig
    from ctedge.training.model import load_model
    from ctedge.training.splits import load_data

    directory, summary = tuned
    model = load_model(directory / "p" / "best_model.keras")
    features = np.load(next((directory / "p").glob("features-*.npz")))
    config = RunConfig.load(directory / "p" / "best_model.keras")
    _, parts = load_data(config.data, PreprocessConfig(image_size=48), parts=("val",))
    full = model.predict(parts["val"].x, verbose=0)[:, 0]
    assert np.ptp(full) > 1e-4, "a constant model would make this test vacuous"
    head_in = keras.Input(features["val_x"].shape[1:])
    x = head_in
    for name in ("head_pool", "head_flatten", "head_dense", "head_output"):
        x = model.get_layer(name)(x)
    cached = keras.Model(head_in, x).predict(features["val_x"], verbose=0)[:, 0]
    np.testing.assert_allclose(full, cached, atol=1e-5)
    assert summary["best_score"] == pytest.approx(roc_auc(parts["val"].y, full), abs=1e-6)  # exact AUC


def test_rerun_resumes_without_running_trials_again(tuned, phantom_data, trained_run, tmp_path):
    import shutil

    directory = shutil.copytree(tuned[0], tmp_path / "tuning")  # the shared project stays as the fixture made it
    summary = tuned[1]
    trial_dirs = sorted(p.name for p in (directory / "p").glob("trial_*"))
    result = runner.invoke(app, tune_args(phantom_data, directory, trained_run,
                                          "--json", str(directory / "again.json")))
    assert result.exit_code == 0, result.output
    again = json.loads((directory / "again.json").read_text())
    assert again["trials"] == summary["trials"]
    assert sorted(p.name for p in (directory / "p").glob("trial_*")) == trial_dirs


def test_changed_search_space_is_refused(tuned, phantom_data, trained_run, tmp_path):
    directory, _ = tuned
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"units_min": 64, "units_max": 512}))
    result = runner.invoke(app, tune_args(phantom_data, directory, trained_run,
                                          "--search-space", str(space)))
    assert result.exit_code == 2 and "another search_space" in result.stderr
    assert (directory / "p" / "best_model.keras").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--algorithm", "grid"], "--algorithm"),
    (["--max-trials", "0"], "--max-trials"),
    (["--role", "worker"], "--oracle must be the chief's HOST:PORT"),
])
def test_bad_options_are_refused(phantom_data, tmp_path, extra, message):
    result = runner.invoke(app, tune_args(phantom_data, tmp_path, "none", *extra))
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_empty_search_space_is_refused(phantom_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("units_min: 512\nunits_max: 64\n")
    result = runner.invoke(app, tune_args(phantom_data, tmp_path, "none", "--search-space", str(space)))
    assert result.exit_code == 2 and "units range" in result.stderr


def test_report_on_a_tuning_project_shows_its_trials(tuned, tmp_path):
    import shutil

    directory, summary = tuned
    project = shutil.copytree(directory / "p", tmp_path / "p")
    result = runner.invoke(app, ["report", str(project), "--no-audit", "--explain", "2", "--resamples", "20"])
    assert result.exit_code == 0, result.output
    page = (project / "report.html").read_text()
    assert "<b>Tuning</b> (cached" in page
    assert page.count("COMPLETED") == len(summary["trials"]) == 2
    assert "Where the model looked" in page


def test_tuning_on_a_trained_run_uses_its_backbone_exactly_as_trained(tuned, trained_run):
    """--weights RUN: the best model carries the run's backbone, same layers and
    weights (no extra rescaling layer), the project records it by content, and
    heads are scored by exact AUC on its features."""
    from ctedge.core.files import file_digest
    from ctedge.training.model import backbone_of, load_model, saved_backbone

    directory, summary = tuned
    trained = backbone_of(load_model(trained_run / "model.keras"))
    best = backbone_of(load_model(directory / "p" / "best_model.keras"))
    assert [layer.name for layer in best.layers] == [layer.name for layer in trained.layers]
    for ours, theirs in zip(best.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    fingerprint = json.loads((directory / "p" / "ctedge_fingerprint.json").read_text())
    assert fingerprint["weights"] == "sha256:" + file_digest(trained_run / "model.keras")
    assert saved_backbone(str(trained_run)) == "tiny"  # what `tune` uses when --backbone is left out


def test_exact_auc_replaces_the_binned_one():
    """Outputs within one of Keras's 200 AUC bins: binned AUC reads 0.5, the
    objective must read the exact rank AUC."""
    from ctedge.core.metrics import roc_auc
    from ctedge.training.tuning import ExactValAUC

    x = np.linspace(0, 1, 20, dtype="float32")[:, None]
    y = (x[:, 0] > 0.5).astype("float32")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.layers[0].set_weights([np.full((1, 1), 1e-4, "float32"), np.zeros(1, "float32")])
    binned = keras.metrics.AUC()
    binned.update_state(y, model.predict(x, verbose=0))
    assert float(binned.result()) == 0.5
    callback = ExactValAUC(x, y, batch_size=64)
    callback.set_model(model)
    logs = {"val_auc": 0.5}
    callback.on_epoch_end(0, logs)
    assert logs["val_auc"] == roc_auc(y, model.predict(x, verbose=0)[:, 0]) == 1.0


def test_a_cached_epoch_is_one_pass_over_the_images_each_as_one_of_its_views():
    """As many steps as the naive search's epoch, not views x images; same rows for a seed and epoch."""
    from ctedge.training.tuning import ViewBatches

    images, views = 10, 3
    x = np.arange(images * views, dtype="float32")[:, None]  # row v * images + i holds that number
    y = np.tile(np.arange(images) % 2, views)
    batches = ViewBatches(x, y, views, batch_size=4, seed=0)
    assert len(batches) == 3
    seen_views = set()
    for epoch in range(4):
        batches.start_at(epoch)
        rows = np.concatenate([batches[k][0][:, 0] for k in range(len(batches))]).astype(int)
        labels = np.concatenate([batches[k][1] for k in range(len(batches))])
        assert sorted(rows % images) == list(range(images))  # every image once
        assert (labels == (rows % images) % 2).all()  # each row keeps its label
        seen_views |= set(rows // images)
        again = ViewBatches(x, y, views, batch_size=4, seed=0)
        again.start_at(epoch)
        assert (again[0][0] == batches[0][0]).all()
    assert seen_views == set(range(views))


def test_eager_trials_are_compiled_to_run_eagerly():
    """tune --eager reaches every trial's model (here a head on cached features); the default
    stays graph mode."""
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.model import ModelConfig
    from ctedge.training.tuning import HeadHyperModel, SearchSpace

    hp = SearchSpace().hyperparameters()
    for eager in (False, True):
        hypermodel = HeadHyperModel((2, 2, 8), ModelConfig(backbone="tiny"), PreprocessConfig(image_size=48), eager)
        assert hypermodel.build(hp).run_eagerly is eager


def test_backbone_features_of_several_arrays_share_one_traced_extractor(monkeypatch):
    """Train views and val through one extractor: its predict step is traced for a full batch
    and for the other sizes once (an extractor per array traced again for each), and each
    array's features are what an extractor of its own gives, bit for bit."""
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.features import backbone_features
    from ctedge.training.model import build_backbone

    preprocess, backbone = PreprocessConfig(image_size=32), build_backbone("none", 32, "tiny")
    rng = np.random.default_rng(0)
    train, val = (rng.uniform(-1000, 400, (n, 32, 32, 3)).astype("float32") for n in (6, 3))
    traces, step = [], keras.Model.predict_step
    monkeypatch.setattr(keras.Model, "predict_step", lambda self, data: traces.append(1) or step(self, data))
    together = backbone_features(backbone, preprocess, train, val, batch_size=4)
    assert len(traces) == 2  # (4, ...) then (None, ...) for the 2 and the 3 left over
    alone = [backbone_features(backbone, preprocess, x, batch_size=4)[0] for x in (train, val)]
    for shared, own in zip(together, alone):
        np.testing.assert_array_equal(shared, own)
