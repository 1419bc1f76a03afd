"""Hostile but fair input (issue 13): edited model metadata, a decompression bomb,
unwritable outputs, a second tuner on one project, and the small ones."""

import json
import os
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zlib

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError
from helpers import brightness_onnx, gray_image, tune_args, write_dicom

runner = CliRunner()


def edited_model(tmp_path, **props) -> str:
    """brightness_onnx with metadata keys replaced (value: raw text) or removed (None)."""
    path = brightness_onnx(tmp_path / "m.onnx")
    model = onnx.load(path)
    entries = {e.key: e.value for e in model.metadata_props}
    for key, value in props.items():
        entries.pop(f"ctedge.{key}", None)
        if value is not None:
            entries[f"ctedge.{key}"] = value
    del model.metadata_props[:]
    for key, value in entries.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, path)
    return str(path)


def png(path, size=40, seed=0):
    cv2.imwrite(str(path), gray_image(size, seed))
    return path


INPUT = {"name": "image", "size": 32}


@pytest.mark.parametrize("key, value, reason", [
    ("classes", "[not json", "not JSON"),
    ("classes", '["A"]', "two distinct class names"),
    ("classes", '["A", "A"]', "two distinct class names"),
    ("classes", "5", "two distinct class names"),
    ("positive_class", '"ZZZ"', "'ZZZ' is not one of the classes"),
    ("threshold", "NaN", "finite number in (0, 1)"),
    ("threshold", '"NaN"', "finite number in (0, 1)"),
    ("threshold", "1.5", "finite number in (0, 1)"),
    ("input", json.dumps({**INPUT, "size": "big"}), "positive integer"),
    ("input", json.dumps({**INPUT, "size": -5}), "positive integer"),
    ("input", json.dumps({**INPUT, "size": 48}), "does not match the graph input"),
    ("input", json.dumps({**INPUT, "name": "nope"}), "'nope' is not an input of the graph"),
    ("preprocess", None, "is missing"),
    ("preprocess", json.dumps({"window_low": 400, "window_high": -1000}), "window_low < window_high"),
    ("preprocess", json.dumps({"window_low": -1000, "window_high": 400, "contract": 3}), "contract 3"),
])
def test_edited_metadata_is_refused_by_key(tmp_path, key, value, reason):
    model = edited_model(tmp_path, **{key: value})
    result = runner.invoke(app, ["predict", model, str(png(tmp_path / "a.png"))])
    assert result.exit_code == 2, result.output
    assert f"metadata ctedge.{key} is" in result.stderr and reason in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bench_gives_the_same_message_as_predict(tmp_path):
    model = edited_model(tmp_path, threshold="NaN")
    result = runner.invoke(app, ["bench", model, "--runs", "1", "--warmup", "0", "--batch-sizes", "1"])
    assert result.exit_code == 2 and "metadata ctedge.threshold is invalid" in result.stderr, result.output
    assert "CalledProcessError" not in result.output


def test_a_failed_fresh_process_run_is_named_not_dumped(tmp_path, monkeypatch):
    model = brightness_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(sys, "executable", "/bin/false")
    result = runner.invoke(app, ["bench", str(model), "--runs", "1", "--warmup", "0", "--batch-sizes", "1"])
    assert result.exit_code == 2, result.output
    assert "fresh-process cold-start run (onnxruntime fp32) failed (exit 1)" in result.stderr


def test_bench_cycles_few_files_and_removes_its_temp_folder(tmp_path, monkeypatch):
    model = brightness_onnx(tmp_path / "m.onnx")
    data = tmp_path / "one"
    data.mkdir()
    png(data / "a.png")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = runner.invoke(app, ["bench", str(model), "--data", str(data), "--seconds", "0.6",
                                 "--warmup", "0", "--batch-sizes", "1", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"][0]["end_to_end_ms"]["runs"] > 1  # one file, timed over and over
    result = runner.invoke(app, ["bench", str(model), "--runs", "1", "--warmup", "0", "--batch-sizes", "1"])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "tmp").glob("ctedge-bench-*"))


# --- pixel budget ---------------------------------------------------------------

def bomb_png(path, side=20000):
    """An all-black 8-bit gray PNG of side x side pixels, a few hundred KB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    rows = b"\0" * ((side + 1) * 500)  # 500 rows: filter byte + pixels each
    idat = b"".join(squeeze.compress(rows) for _ in range(side // 500)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_the_bomb_gets_an_error_row_and_the_rest_go_on(tmp_path, bomb):
    model = brightness_onnx(tmp_path / "m.onnx")
    good = png(tmp_path / "good.png")
    result = runner.invoke(app, ["predict", str(model), str(bomb), str(good), "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    rows = {row["path"]: row for row in json.loads((tmp_path / "p.json").read_text())["predictions"]}
    assert "20000x20000 pixels (400 MP) is above the 50 MP limit" in rows[str(bomb)]["error"]
    assert rows[str(good)]["probability"] is not None


def test_predict_on_the_bomb_stays_under_1_gb(tmp_path, bomb):
    """Peak resident memory of the whole `ctedge predict` process."""
    model = brightness_onnx(tmp_path / "m.onnx")
    code = ("import resource, subprocess, sys; "
            "subprocess.run([sys.executable, '-m', 'ctedge.cli', 'predict', sys.argv[1], sys.argv[2]]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(bomb)], capture_output=True, text=True)
    peak_mb = int(out.stdout.split()[-1]) / 1024
    assert peak_mb < 1024, peak_mb


def test_the_limit_is_an_option_and_covers_dicom(tmp_path):
    model = brightness_onnx(tmp_path / "m.onnx")
    image = png(tmp_path / "a.png", size=40)
    dicom = write_dicom(tmp_path / "s.dcm", np.full((40, 40), -600.0))
    result = runner.invoke(app, ["--max-pixels", "1000", "predict", str(model), str(image), str(dicom),
                                 "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    rows = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert [r["error"].split(" (")[0] for r in rows] == ["40x40 pixels"] * 2
    assert all("above the 0.001 MP limit" in r["error"] for r in rows)
    assert runner.invoke(app, ["--max-pixels", "1600", "predict", str(model), str(image), str(dicom)]).exit_code == 0


def test_the_budget_belongs_to_each_classifier_not_the_process(tmp_path, model):
    """Two Classifiers with different budgets, side by side in one process, answer
    the same 60x60 image differently: the budget is no global."""
    from ctedge.edge.runtime import Classifier

    image = png(tmp_path / "a.png", size=60)
    strict, roomy = Classifier(model, max_pixels=3599), Classifier(model, max_pixels=3600)
    for _ in range(2):  # in either order, more than once: neither changes the other
        (refused,) = strict.predict_files([image])
        (answered,) = roomy.predict_files([image])
        assert refused.probability is None
        assert refused.error.startswith("60x60 pixels (0.0036 MP) is above the 0.003599 MP limit")
        assert answered.error is None and answered.probability is not None
    with pytest.raises(CtedgeError, match="at least 1") as caught:
        Classifier(model, max_pixels=0)
    assert caught.value.param == "max_pixels"


def test_the_environment_budget_reaches_commands_that_read_data(tmp_path, monkeypatch):
    """CTEDGE_MAX_PIXELS holds for `audit` (which reads class folders through
    DataOptions) as --max-pixels does for predict, and only for that invocation."""
    for c, name in enumerate(("CT_COVID", "CT_NonCOVID")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            png(tmp_path / "data" / name / f"{name}_{i}.png", size=40 + i % 2, seed=10 * c + i)
    monkeypatch.setenv("CTEDGE_MAX_PIXELS", "1600")
    result = runner.invoke(app, ["audit", str(tmp_path / "data"), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    unreadable = json.loads((tmp_path / "a.json").read_text())["unreadable"]
    assert [u["reason"].split(" (")[0] for u in unreadable] == ["41x41 pixels"] * 8
    monkeypatch.delenv("CTEDGE_MAX_PIXELS")
    result = runner.invoke(app, ["audit", str(tmp_path / "data"), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0 and json.loads((tmp_path / "a.json").read_text())["unreadable"] == []


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_the_size_is_read_from_the_header(tmp_path, suffix):
    from ctedge.core.imageio import raster_size

    ok, data = cv2.imencode(suffix, np.zeros((23, 37), np.uint8))
    assert ok and raster_size(data) == (37, 23)
    assert raster_size(data[:10]) is None  # cut short: unreadable, not a crash


def test_a_large_image_is_resized_before_it_is_padded():
    from ctedge.core.preprocess import letterbox

    wide = np.full((100, 20000), 200, np.float32)  # padded first, a 1.6 GB float32 square
    tracemalloc.start()
    square = letterbox(wide, 32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000, peak
    assert square.shape == (32, 32) and square[15].min() == pytest.approx(200)  # one row, centred
    assert np.delete(square, 15, axis=0).max() == 0


# --- outputs checked before the work ----------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["predict", "missing.onnx", "x.png", "--csv", "{b}/p.csv"], "--csv"),
    (["predict", "missing.onnx", "x.png", "--json", "{b}/p.json"], "--json"),
    (["bench", "missing.onnx", "--markdown", "{b}/b.md"], "--markdown"),
    (["train", "missing-data", "-o", "{b}/run"], "--out"),
    (["export", "missing.keras", "--onnx", "-o", "{b}/m.onnx"], "--output"),
    (["evaluate", "missing.keras", "missing-data", "--html", "{b}/e.html"], "--html"),
    (["audit", "missing-data", "--json", "{b}/a.json"], "--json"),
    (["tune", "missing-data", "--directory", "{b}/tuning"], "--directory"),
    (["explain", "m.keras", "{image}", "--out", "{b}/explained"], "--out"),
    (["report", "missing-run", "--out", "{b}/r.html"], "--out"),
])
def test_an_unwritable_output_is_named_before_any_work(tmp_path, args, option):
    blocker = tmp_path / "a-file"  # as root nothing is read-only: a file where a folder must be
    blocker.write_text("")
    image = png(tmp_path / "x.png")
    args = [a.format(b=blocker, image=image) for a in args]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert f"{option} {blocker}/" in result.stderr, result.stderr  # the output, not the missing input


def test_an_output_folder_that_refuses_new_files_is_named_before_any_work(tmp_path, model, monkeypatch):
    """os.access answers yes to root for /proc, where no file can be made (the prediction
    ran, its table printed, then --json failed); a folder that refuses to create is
    simulated for other users, to whom os.access already says no."""
    import ctedge.core.files as files

    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_CREAT and os.path.dirname(path) == str(tmp_path / "out"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args)

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(files.os, "open", refusing)
    image = png(tmp_path / "x.png")
    result = runner.invoke(app, ["predict", str(model), str(image), "--json", str(tmp_path / "out" / "p.json")])
    assert result.exit_code == 2 and "--json" in result.stderr and "not writable" in result.stderr, result.output
    assert "probability" not in result.stdout  # nothing was predicted


def test_json_and_csv_are_replaced_whole(tmp_path):
    """Atomic: a new file is renamed over the old one (a hard link to the old keeps it)."""
    model = brightness_onnx(tmp_path / "m.onnx")
    image = png(tmp_path / "a.png")
    for option, name in (("--json", "p.json"), ("--csv", "p.csv")):
        (tmp_path / name).write_text("old")
        os.link(tmp_path / name, tmp_path / f"twin-{name}")
        assert runner.invoke(app, ["predict", str(model), str(image), option, str(tmp_path / name)]).exit_code == 0
        assert (tmp_path / f"twin-{name}").read_text() == "old"
        assert str(image) in (tmp_path / name).read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_temp_files_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    from ctedge.core.files import atomic_write

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".m.onnx.{dead.pid}.abc.tmp"
    live = tmp_path / f".m.onnx.{os.getpid()}.abc.tmp"
    left.write_text("half")
    live.write_text("being written")
    atomic_write(b"x", tmp_path / "m.onnx")
    assert not left.exists() and live.exists()


def test_atomic_write_is_durable_and_leaves_the_umask_alone(tmp_path, monkeypatch):
    """The data reach the disk before the rename and the rename before it returns (fsync of
    the file, then of its folder); permissions follow the umask without flipping it (a
    process-wide setting other threads read)."""
    import stat as stat_module

    from ctedge.core import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", stat_module.S_ISDIR(os.fstat(fd).st_mode)))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))

    def no_umask(mask):
        raise AssertionError("atomic_write changed the process's umask")

    monkeypatch.setattr(os, "umask", no_umask)
    target = tmp_path / "out.json"
    files.atomic_write(b"{}", target)
    assert events == [("fsync", False), ("replace",), ("fsync", True)]
    umask = int(subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True).stdout, 8)
    assert stat_module.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert target.read_bytes() == b"{}" and not list(tmp_path.glob(".*.tmp"))


def test_a_full_disk_is_a_write_error_that_keeps_its_errno(tmp_path, monkeypatch):
    """A failed write names the path and keeps the OS's errno, so the node tells a full disk
    (ENOSPC: pause until space is back) from any other write error; no temp file is left."""
    import errno

    from ctedge.core import files
    from ctedge.edge.serve.faults import is_disk_full

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.WriteError, match="out.dcm: cannot write .No space left on device") as caught:
        files.atomic_write(b"data", tmp_path / "out.dcm", fresh_name=True)
    assert caught.value.errno == errno.ENOSPC and is_disk_full(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_taken_over_from_a_dead_holder_has_one_holder(tmp_path, monkeypatch):
    """Two contenders find a dead holder's lock at once: one takes it over, the other is
    refused while it holds it (the takeover is not a read-then-unlink race)."""
    import contextlib
    import socket

    from ctedge.core import files

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = tmp_path / "p.lock"
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    second: dict = {}
    held = contextlib.ExitStack()
    real_warning = files.log.warning

    def contender_b(*args):
        if not second:  # while contender A takes over, B tries
            second["tried"] = True
            try:
                held.enter_context(files.exclusive_lock(lock, "project p"))
                second["holds"] = True
            except CtedgeError:
                second["holds"] = False
        real_warning(*args)

    monkeypatch.setattr(files.log, "warning", contender_b)
    with held:
        try:
            with files.exclusive_lock(lock, "project p"):
                a_holds = True
        except CtedgeError:
            a_holds = False
    assert second.get("tried") and [a_holds, second["holds"]].count(True) == 1


# --- one tuner per project -------------------------------------------------------

def test_a_second_tuner_on_a_project_is_refused_naming_the_holder(tmp_path, phantom_data):
    import socket

    from ctedge.core.files import exclusive_lock

    with exclusive_lock(tmp_path / "p.lock", "project p"):  # the first tuner
        result = runner.invoke(app, tune_args(phantom_data, tmp_path, "none"))
    assert result.exit_code == 2, result.output
    assert f"in use by process {os.getpid()} on {socket.gethostname()}" in result.stderr
    assert not (tmp_path / "p").exists()  # refused before anything was written


def test_a_dead_holders_lock_is_taken_over_and_released(tmp_path, caplog):
    import socket

    from ctedge.core.files import exclusive_lock

    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = tmp_path / "p.lock"
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    with exclusive_lock(lock, "project p"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CtedgeError, match=f"in use by process {os.getpid()}"):
            with exclusive_lock(lock, "project p"):
                pass
    assert f"process {gone.pid}" in caplog.text and "is gone" in caplog.text
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": gone.pid, "host": "elsewhere"}))  # another host: cannot tell
    with pytest.raises(CtedgeError, match="on elsewhere"):
        with exclusive_lock(lock, "project p"):
            pass


def test_workers_do_not_take_the_lock(tmp_path, monkeypatch):
    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training import tuning
    from ctedge.training.model import ModelConfig

    def refuse(*args):
        raise AssertionError("a worker took the project lock")

    monkeypatch.setattr(tuning, "exclusive_lock", refuse)
    monkeypatch.setattr(tuning, "_search", lambda *args: "searched")
    tuning.set_distributed("worker", "127.0.0.1:1", "w1")
    try:
        assert tuning.tune(DataOptions(root=str(tmp_path)), ModelConfig(), PreprocessConfig(),
                           tuning.TuneOptions(directory=str(tmp_path))) == "searched"
    finally:
        for name in ("KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID"):
            os.environ.pop(name, None)


# --- kill-safe, resumable training --------------------------------------------------

def test_a_killed_training_run_resumes_with_every_epoch_once(tmp_path):
    """Killed after its first epoch, a two-epoch run resumes for the second (12 small
    phantoms, batches of 4 with no remainder, --eager: the kill and the resume are tested,
    not the training; the session's `trained` run is the graph-mode one)."""
    import csv
    import time

    from ctedge.core.phantoms import make_dataset

    data = make_dataset(tmp_path / "data", per_class=6, size=32, seed=2)
    run = tmp_path / "run"
    args = ["train", str(data), "--backbone", "tiny", "--weights", "none", "--image-size", "32",
            "--epochs", "2", "--batch-size", "4", "--units", "8", "--test-fraction", "0", "--val-fraction", "0.34",
            "--eager", "-o", str(run)]
    victim = subprocess.Popen([sys.executable, "-m", "ctedge.cli", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "resume" / "state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.kill()
    assert victim.wait() == -9  # killed mid-run, not finished
    saved = json.loads(state.read_text())
    done = saved["epochs_done"]
    assert done == 1
    assert saved["best"] is not None and saved["early_stopping"]["best"] == saved["best"]
    from ctedge.training.model import load_model

    load_model(run / "model.keras")  # the best so far is whole, whenever the kill came
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "add --resume" in refused.stderr, refused.output
    result = runner.invoke(app, [*args, "--resume", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    assert f"resuming {run} after epoch 1 of 2" in result.stderr
    with open(run / "history.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1"]
    assert json.loads((tmp_path / "t.json").read_text())["result"]["epochs_run"] == 2
    assert not (run / "resume").exists() and not list(run.glob(".*tmp*"))
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 2 and "nothing to resume" in again.stderr
