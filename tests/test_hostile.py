"""Hostile outputs and hostile single images (issue 22): nothing written outside the
named outputs, no crash of the batch, strict numbers, clear reasons."""

import csv
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError, UnreadableImage
from helpers import brightness_onnx, gray_image

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return brightness_onnx(tmp_path_factory.mktemp("model") / "m.onnx")


def png(path, size=40, seed=0) -> Path:
    Path(path).write_bytes(cv2.imencode(".png", gray_image(size, seed))[1].tobytes())  # any file name
    return Path(path)


def strict(text: str):
    """json.loads that refuses NaN and infinity, as strict parsers do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))


# --- outputs: regular files or new paths only ------------------------------------

def test_a_fifo_or_a_link_to_one_is_refused_and_kept(tmp_path, model):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    image = png(tmp_path / "a.png")
    for target in (fifo, tmp_path / "link"):
        result = runner.invoke(app, ["predict", str(model), str(image), "--json", str(target)])
        assert result.exit_code == 2, result.output
        assert f"--json {target}: is not a regular file" in result.stderr and "- is stdout" in result.stderr
    assert fifo.is_fifo() and (tmp_path / "link").is_symlink()


def test_dev_stdout_is_refused_with_a_pointer_to_dash():
    from ctedge.core.files import WriteError, output_target

    with pytest.raises(WriteError, match="- is stdout"):
        output_target(Path("/dev/stdout"))
    with pytest.raises(WriteError, match="not a regular file"):
        output_target(Path("/dev/null"))


def test_a_folder_is_called_a_folder(tmp_path, model):
    image = png(tmp_path / "a.png")
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["predict", str(model), str(image), "--json", str(tmp_path / "out")])
    assert result.exit_code == 2 and "is a folder, not a file" in result.stderr, result.output


def test_a_symlink_to_a_regular_file_is_written_through(tmp_path, model):
    image = png(tmp_path / "a.png")
    real = tmp_path / "real.csv"
    real.write_text("old")
    (tmp_path / "latest.csv").symlink_to(real)
    result = runner.invoke(app, ["predict", str(model), str(image), "--csv", str(tmp_path / "latest.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "latest.csv").is_symlink() and str(image) in real.read_text()


@pytest.mark.parametrize("option, victim", [("--json", "a.png"), ("--csv", "m.onnx"), ("--json", "scans/b.png"),
                                            ("--csv", "hardlink.png")])
def test_an_output_that_is_an_input_or_the_model_is_refused(tmp_path, option, victim):
    model = brightness_onnx(tmp_path / "m.onnx")
    image = png(tmp_path / "a.png")
    (tmp_path / "scans").mkdir()
    png(tmp_path / "scans" / "b.png")
    os.link(image, tmp_path / "hardlink.png")
    before = (tmp_path / victim).read_bytes()
    result = runner.invoke(app, ["predict", str(model), str(image), str(tmp_path / "scans"),
                                 option, str(tmp_path / victim)])
    assert result.exit_code == 2, result.output
    assert f"{option} {tmp_path / victim}: is an input" in result.stderr
    assert (tmp_path / victim).read_bytes() == before


def test_dash_is_stdout_for_csv_and_json(tmp_path, model):
    image = png(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(model), str(image), "--csv", "-"])
    assert result.exit_code == 0 and f"{image}," in result.stdout, result.output
    result = runner.invoke(app, ["predict", str(model), str(image), "--json", "-"])
    assert strict(result.stdout[result.stdout.index("{"):])["predictions"][0]["path"] == str(image)


def test_a_write_error_is_one_line_naming_the_path(tmp_path, model):
    """`ulimit -f`: the JSON can't be written after all the work; exit 2, no traceback."""
    image = png(tmp_path / "a.png")
    out = tmp_path / "p.json"

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    result = subprocess.run([sys.executable, "-m", "ctedge.cli", "predict", str(model), str(image),
                             "--json", str(out)], capture_output=True, text=True, preexec_fn=small_files,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{out}: cannot write (File too large)" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_plot_names_from_data_stay_in_their_folder(tmp_path):
    from ctedge.core.plots import study_plot_path

    plots = tmp_path / "plots"
    for patient, uid in (("P1", "1.2.840/../../escpd"), ("../../etc", "../../etc"), ("[/red]\x1b[2J", None),
                         ("..", "..")):
        path = study_plot_path(patient, uid, plots)
        assert path.parent == plots and not path.name.startswith("."), path
        assert path.suffix == ".png" and "/" not in path.name
    assert study_plot_path("P1", "1.2.840.99", plots) != study_plot_path("P1", "1.2.840.98", plots)


def test_safe_child_refuses_a_planted_link(tmp_path):
    from ctedge.core.files import safe_child

    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "x.dcm").symlink_to("/etc/passwd")
    with pytest.raises(CtedgeError, match="not a file name inside"):
        safe_child(tmp_path / "spool", "x.dcm")
    assert safe_child(tmp_path / "spool", "../y.dcm") == tmp_path / "spool" / "_y.dcm"


# --- one bad input never ends the batch; file text is text ------------------------

def test_markup_and_control_characters_in_file_names(tmp_path, model):
    names = ["x[/b].png", "[/red].png", "esc\x1b[2J\x07.png", os.fsdecode(b"bad\xff.png")]
    for i, name in enumerate(names):  # a path holding [/b]: folder "x[", file "b].png"
        (tmp_path / name).parent.mkdir(exist_ok=True)
        png(tmp_path / name, seed=i)
    result = runner.invoke(app, ["predict", str(model), str(tmp_path), "--csv", str(tmp_path / "p.csv"),
                                 "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "b].png" in result.output and "red].png" in result.output
    assert len(strict((tmp_path / "p.json").read_text())["predictions"]) == 4
    assert b"bad\xff.png" in (tmp_path / "p.csv").read_bytes()  # the name as it is on disk


def test_an_error_message_is_stripped_of_control_characters(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "m\x1b[2J.onnx"), str(png(tmp_path / "a.png"))])
    assert result.exit_code == 2 and "m?[2J.onnx" in result.stderr and "\x1b" not in result.stderr


# --- numbers ---------------------------------------------------------------------

def test_a_nan_output_is_an_error_row_and_json_stays_strict(tmp_path):
    model = brightness_onnx(tmp_path / "nan.onnx", centre=float("nan"))
    image = png(tmp_path / "a.png")
    result = runner.invoke(app, ["predict", str(model), str(image), "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    row = strict((tmp_path / "p.json").read_text())["predictions"][0]
    assert row["probability"] is None and row["label"] is None and "the model gave nan" in row["error"]


def test_json_writer_writes_non_finite_as_null(caplog):
    from ctedge.core.results import dumps

    data = strict(dumps({"auc": float("nan"), "rows": [np.float32("inf"), 1.5]}, strict=False))
    assert data == {"auc": None, "rows": [None, 1.5]}
    assert "$.auc is nan" in caplog.text
    with pytest.raises(ValueError, match=r"\$.auc is nan"):  # a typed result never holds one
        dumps({"auc": float("nan")})


def test_model_cards_tuning_files_and_report_steps_are_strict_json(tmp_path):
    """Export's model card, tuning's files, a run's config and the report's cached steps
    write an undefined metric (NaN) as null, as every other ctedge JSON file."""
    from ctedge.core.data import DataOptions
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.core.runconfig import ModelConfig, RunConfig, TuneResult
    from ctedge.evaluation.report import _cached
    from ctedge.training import export, tuning

    nan = float("nan")
    export._write_card({"parity": {"auc_change": nan}}, tmp_path / "m.onnx")
    assert strict((tmp_path / "m.json").read_text())["parity"]["auc_change"] is None
    tuning._guard_project(tmp_path / "p", {"best_score": nan})
    assert strict((tmp_path / "p" / "ctedge_fingerprint.json").read_text()) == {"best_score": None}
    RunConfig(kind="tune", data=DataOptions(root=str(tmp_path)), model=ModelConfig(), preprocess=PreprocessConfig(),
              classes=["a", "b"], tune=TuneResult(hyperparameters={}, best_score=nan)).save(tmp_path / "config.json")
    assert strict((tmp_path / "config.json").read_text())["tune"]["best_score"] is None
    _cached(tmp_path / "step.json", lambda: {"auc": nan}, {"k": 1})
    assert strict((tmp_path / "step.json").read_text())["auc"] is None


# --- CSV injection ------------------------------------------------------------------

def test_csv_cells_that_start_a_formula_are_neutralised():
    import csv
    import io

    from ctedge.core.files import csv_text

    rows = [{"patient": "=cmd|' /C calc'!A0", "p": -0.25, "s": "-0.25"},
            {"patient": "@SUM(A1)", "p": 0.5, "s": "+x"}, {"patient": "\tx", "p": 1, "s": "\rx"}]
    read = list(csv.DictReader(io.StringIO(csv_text(["patient", "p", "s"], rows))))
    assert [r["patient"] for r in read] == ["'=cmd|' /C calc'!A0", "'@SUM(A1)", "'\tx"]
    assert [r["p"] for r in read] == ["-0.25", "0.5", "1"] and [r["s"] for r in read] == ["-0.25", "'+x", "'\rx"]


def test_a_formula_file_name_is_neutralised_in_predict_csv(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    png(tmp_path / "=1+2.png")
    result = runner.invoke(app, ["predict", str(model), "=1+2.png", "--csv", "p.csv"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").read_text().splitlines()[1].startswith("'=1+2.png,0.")


# --- images that cannot hold a CT slice -----------------------------------------------

@pytest.mark.parametrize("shape, reason", [
    ((1, 100000), "a side under 16 px"), ((1, 1), "a side under 16 px"),
    ((20, 200), "an aspect ratio over 4:1"), ((400, 40), "an aspect ratio over 4:1")])
def test_images_that_cannot_hold_a_slice_are_refused_from_the_header(tmp_path, model, shape, reason):
    path = tmp_path / "odd.png"
    cv2.imwrite(str(path), np.full(shape, 200, np.uint8))
    good = png(tmp_path / "good.png")
    result = runner.invoke(app, ["predict", str(model), str(path), str(good), "--json", str(tmp_path / "p.json")])
    assert result.exit_code == 1, result.output
    rows = {r["path"]: r for r in strict((tmp_path / "p.json").read_text())["predictions"]}
    assert f"{shape[1]}x{shape[0]} pixels: {reason}" in rows[str(path)]["error"]
    assert rows[str(good)]["probability"] is not None


def test_a_cmyk_jpeg_is_refused(tmp_path):
    from PIL import Image

    from ctedge.core.imageio import read_image

    Image.fromarray(gray_image(64)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with pytest.raises(UnreadableImage, match="CMYK JPEG"):
        read_image(tmp_path / "cmyk.jpg")


def test_a_palette_png_is_read_through_its_palette(tmp_path):
    from PIL import Image

    from ctedge.core.imageio import read_image

    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[:, :24] = (200, 100, 50)
    rgb[:, 24:] = (10, 240, 90)
    Image.fromarray(rgb).quantize(colors=4).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as image:
        assert image.mode == "P"
        expected = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY).astype(np.float32)
    assert np.abs(read_image(tmp_path / "palette.png").gray - expected).max() <= 1
    assert expected[0, 0] != expected[0, -1]


def rgba16_png(path, side=7000):
    """An all-black 16-bit RGBA PNG of side x side pixels (49 MP, 392 MB decoded), streamed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze = zlib.compressobj(9)
    rows = b"\0" * ((side * 8 + 1) * 100)
    idat = b"".join(squeeze.compress(rows) for _ in range(side // 100)) + squeeze.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 6, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_49_mp_16_bit_png_stays_under_1_gb(tmp_path, model):
    """Peak resident memory of the whole `ctedge predict` process (1.77 GB before)."""
    big = rgba16_png(tmp_path / "big.png")
    code = ("import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'ctedge.cli', 'predict', sys.argv[1], sys.argv[2]]); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(big)], capture_output=True, text=True,
                         timeout=60)
    code, peak_kb = map(int, out.stdout.split()[-2:])
    assert code == 0, out.stderr
    assert peak_kb / 1024 < 1024, peak_kb


def test_16_bit_colour_keeps_its_colour_in_8_bits(tmp_path):
    from ctedge.core.imageio import read_image

    image = np.zeros((32, 32, 4), np.uint16)
    image[..., 2], image[..., 3] = 51400, 65535  # red, opaque
    cv2.imwrite(str(tmp_path / "deep.png"), image)
    decoded = read_image(tmp_path / "deep.png")
    assert decoded.colour.dtype == np.uint8 and tuple(decoded.colour[0, 0]) == (0, 0, 200)
    assert decoded.gray[0, 0] == pytest.approx(0.299 * 200, abs=0.5)


def test_a_decoder_error_is_that_files_error(tmp_path, monkeypatch):
    from ctedge.core import imageio

    def broken(*args):
        raise cv2.error("boom")

    monkeypatch.setattr(imageio.cv2, "imdecode", broken)
    with pytest.raises(UnreadableImage, match="cannot decode the image"):
        imageio.read_image(png(tmp_path / "a.png"))


# --- a study whose tags are hostile ---------------------------------------------------

def test_hostile_study_tags_are_text_in_the_table_csv_and_plot_names(tmp_path, model):
    """PatientID with markup, a formula and an escape sequence; SeriesDescription with
    markup; a StudyInstanceUID that climbs out of the plot folder."""
    from ctedge.core.phantom_studies import phantom_volume, write_series

    rng = np.random.default_rng(3)
    hostile = "=cmd|' /C calc'!A0[/red]\x1b[2J$x^{$"
    write_series(tmp_path / "study", phantom_volume(rng, 12, 64, True), rng, study_uid="1.2.840/../../escpd",
                 patient_id=hostile, description="[/b]CHEST")
    plots = tmp_path / "out" / "plots"
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "study"), "--study",
                                 "--csv", str(tmp_path / "s.csv"), "--plot", str(plots)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[/b]CHEST" in result.output
    row = next(csv.DictReader((tmp_path / "s.csv").open()))
    assert row["patient_id"] == "'" + hostile and float(row["probability"]) >= 0
    written = [p for p in tmp_path.rglob("*.png")]
    assert len(written) == 1 and written[0].parent == plots, written


@pytest.mark.parametrize("args, option, victim", [
    (["bench", "{m}", "--markdown", "{m}"], "--markdown", "m.onnx"),
    (["bench", "{m}", "--json", "{d}/m.json"], "--json", "m.json"),
    (["audit", "{d}/data", "--json", "{d}/data/a/x.png"], "--json", "data/a/x.png"),
    (["predict", "{m}", "{d}/data", "--study", "--csv", "{d}/data/a/IM0001"], "--csv", "data/a/IM0001")])
def test_other_commands_refuse_an_input_as_output(tmp_path, args, option, victim):
    from ctedge.core.phantom_studies import write_slice

    model = brightness_onnx(tmp_path / "m.onnx")
    (tmp_path / "m.json").write_text("{}")  # the model card
    (tmp_path / "data" / "a").mkdir(parents=True)
    png(tmp_path / "data" / "a" / "x.png")
    write_slice(tmp_path / "data" / "a" / "IM0001", np.zeros((32, 32)), {"SOPInstanceUID": "1.2.3"})  # no suffix
    before = (tmp_path / victim).read_bytes()
    result = runner.invoke(app, [a.format(m=model, d=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert f"{option} {tmp_path / victim}: is an input" in result.stderr
    assert (tmp_path / victim).read_bytes() == before


def test_a_plot_that_cannot_be_written_is_named(tmp_path):
    from ctedge.core.files import WriteError
    from ctedge.core.plots import latency_histogram

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=f"{blocker}/lat.png: cannot write"):
        latency_histogram({"cpu": np.arange(10.0)}, blocker / "lat.png")


def test_log_lines_lose_their_control_characters():
    import logging

    from ctedge.cli.common import PrintableLog

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s: skipped", ("a\x1b[2J.dcm",), None)
    assert PrintableLog().filter(record) and record.getMessage() == "a?[2J.dcm: skipped"


def test_dash_for_an_output_that_cannot_be_stdout_is_refused(tmp_path, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench", str(model), "--plot", "-", "--runs", "1", "--warmup", "0"])
    assert result.exit_code == 2 and "--plot -: this output can't go to stdout" in result.stderr, result.output
    assert not (tmp_path / "-").exists()


def test_a_full_stdout_is_one_line_and_exit_2(tmp_path, model):
    image = png(tmp_path / "a.png")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "ctedge.cli", "predict", str(model), str(image), "--csv", "-"],
                                stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "error: stdout: cannot write (No space left on device)" in result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
