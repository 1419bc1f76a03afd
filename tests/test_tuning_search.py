"""Search algorithms and modes beyond the shared cached project: distributed
chief/workers, naive full-model trials, Hyperband's brackets, Bayesian proposals,
a random-weights backbone. (A file of its own so pytest-xdist runs it beside
test_tuning.py.)"""

import json

import numpy as np
from typer.testing import CliRunner

from ctedge.cli import app
from helpers import free_port, tune_args

runner = CliRunner()


def wait_for_port(port: int, chief, seconds: float) -> None:
    """Until something listens on 127.0.0.1:port; fails early if the ``chief`` thread ended."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert chief.is_alive(), "the chief ended before serving the oracle"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listened on port {port} within {seconds} s")


def test_chief_and_two_workers_run_every_trial_once(tmp_path, phantom_data):
    """`tune --role chief` serves Keras Tuner's oracle and two `tune --role worker` processes
    share its trials, each run once. The chief runs here, on a thread (it only computes the
    cached features, serves and saves; a process of its own cost another TensorFlow import);
    the workers are processes of their own, as on other machines."""
    import os
    import subprocess
    import sys
    import threading

    port = free_port()
    distributed = ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID")
    env = {**{k: v for k, v in os.environ.items() if k not in distributed}, "TF_CPP_MIN_LOG_LEVEL": "3"}
    args = [*tune_args(phantom_data, tmp_path, "none")[:-2], "--project", "dist", "--max-trials", "2",
            "--epochs", "1", "--eager", "--oracle", f"127.0.0.1:{port}"]
    chief_ran = []
    chief = threading.Thread(target=lambda: chief_ran.append(runner.invoke(
        app, [*args, "--role", "chief", "--json", str(tmp_path / "chief.json")])), daemon=True)
    chief.start()
    try:
        wait_for_port(port, chief, 180)  # the chief computes the cached features, then serves the oracle
        workers = [subprocess.Popen([sys.executable, "-m", "ctedge.cli", *args, "--role", "worker", "--tuner-id",
                                     f"w{i}", "--json", str(tmp_path / f"w{i}.json")], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for i in (1, 2)]
        for process in workers:
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, output
        chief.join(300)
        assert chief_ran and chief_ran[0].exit_code == 0, chief_ran and chief_ran[0].output
    finally:
        for name in distributed:  # the chief's CLI set them for this process
            os.environ.pop(name, None)
    ran = [json.loads((tmp_path / f"w{i}.json").read_text())["trials_run"] for i in (1, 2)]
    summary = json.loads((tmp_path / "chief.json").read_text())
    assert sorted(ran[0] + ran[1]) == sorted(t["trial"] for t in summary["trials"])
    assert len(summary["trials"]) == 2 and all(t["status"] == "COMPLETED" for t in summary["trials"])


def test_naive_mode_trains_full_models_in_a_fresh_process(tmp_path, phantom_data):
    """Full-model trials run in a child process each (one per trial: see
    CtedgeTuner._build_and_fit_model), so what TensorFlow keeps after a trial cannot
    pile up in the search's process; their checkpoints still load."""
    import os

    result = runner.invoke(app, [*tune_args(phantom_data, tmp_path, "none", "--no-cache", "--eager"),
                                 "--max-trials", "1", "--epochs", "1", "--json", str(tmp_path / "s.json")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    trial = summary["trials"][0]
    assert summary["mode"] == "naive" and trial["status"] == "COMPLETED"
    assert f"trial {trial['trial']} completed: units 256" in result.stderr  # as it finished
    assert trial["pid"] not in (None, os.getpid())
    assert trial["epochs_run"] == 1 and 0 < trial["fit_seconds"] < trial["seconds"]
    assert (tmp_path / "p" / "best_model.keras").is_file()
    assert not list((tmp_path / "p").glob("features-*.npz"))


def test_random_init_backbone_of_the_best_model_is_the_one_features_came_from(tmp_path, phantom_data):
    """With --weights none the cached features come from a random backbone; the
    saved best model must carry that same backbone, not a fresh random one."""
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.runconfig import RunConfig
    from ctedge.training.features import backbone_features
    from ctedge.training.model import backbone_of, load_model
    from ctedge.training.splits import load_data

    args = ["tune", str(phantom_data), "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--max-trials", "1",
            "--epochs", "1", "--views", "1", "--eager", "--directory", str(tmp_path), "--project", "r"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    best = tmp_path / "r" / "best_model.keras"
    model = load_model(best)
    preprocess = PreprocessConfig(image_size=32)
    _, parts = load_data(RunConfig.load(best).data, preprocess, parts=("val",))
    cached = np.load(next((tmp_path / "r").glob("features-*.npz")))["val_x"]
    (rebuilt,) = backbone_features(backbone_of(model), preprocess, parts["val"].x)
    scale = np.abs(cached).max()  # a random backbone's features are tiny (~1e-6): compare relative to them
    assert scale > 0
    np.testing.assert_allclose(rebuilt / scale, cached / scale, atol=1e-3)


def test_hyperband_trains_brackets_with_epoch_budgets_and_warm_starts(tmp_path, phantom_data, trained_run, recwarn):
    result = runner.invoke(app, [*tune_args(phantom_data, tmp_path, trained_run, "--algorithm", "hyperband", "--eager"),
                                 "--max-trials", "4", "--epochs", "3", "--json", str(tmp_path / "h.json")])
    # max 3 epochs, factor 3: the first bracket trains 3 trials for 1 epoch, then the best on to 3
    assert result.exit_code == 0, result.output
    trials = {t["trial"]: t for t in json.loads((tmp_path / "h.json").read_text())["trials"]}
    assert sorted(t["epochs"] for t in trials.values()) == [1, 1, 1, 3]
    first = trials[min(trials)]
    assert (first["units"], first["learning_rate"], first["parent"]) == (256, 5e-5, None)
    promoted = [t for t in trials.values() if t["parent"] is not None]
    assert promoted, "no trial was continued from a parent's checkpoint"
    for t in promoted:  # same hyperparameters, trained on from where the parent stopped
        parent = trials[t["parent"]]
        assert (t["units"], t["learning_rate"]) == (parent["units"], parent["learning_rate"])
        assert t["initial_epoch"] == parent["epochs"] < t["epochs"]
    skipped = [str(w.message) for w in recwarn if "Skipping variable loading" in str(w.message)]
    assert not skipped, skipped  # the warm start brought Adam's state along with the weights


def test_bayesian_later_trials_depend_on_earlier_scores(tmp_path):
    """Same seed, two different score landscapes: the seeded initial points are
    equal, the first model-based proposal is not; the paper's defaults come first."""
    from ctedge.training.tuning import SearchSpace, TuneOptions, _oracle

    def proposals(score, project: str) -> list[dict]:
        oracle = _oracle(TuneOptions(algorithm="bayesian", max_trials=7), SearchSpace(dropout_max=0))
        oracle._set_project_dir(str(tmp_path), project)
        values = []
        for _ in range(7):
            trial = oracle.create_trial("t")
            values.append(dict(trial.hyperparameters.values))
            oracle.update_trial(trial.trial_id, {"val_auc": score(trial.hyperparameters.values)})
            trial.status = "COMPLETED"
            oracle.end_trial(trial)
        return values

    up = proposals(lambda v: float(np.log(v["units"])), "up")
    down = proposals(lambda v: -float(np.log(v["units"])), "down")
    initial = 6  # 2 hyperparameters: 3 x 2 random initial points
    assert (up[0]["units"], up[0]["learning_rate"]) == (256, 5e-5)
    assert up[:initial] == down[:initial]
    assert up[initial:] != down[initial:]
