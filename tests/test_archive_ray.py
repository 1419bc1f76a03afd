"""An archive scored on a local Ray cluster (`predict --study --ray`): the same answers as
one process, a rerun that adds nothing, a run stopped half-way that resumes with every
study once, a corrupt zip as an error row.

One cluster for the module (`ray.init(num_cpus=2)`, seconds to start), two tests, so a
pytest-xdist run starts at most two; `pytest -m "not ray"` leaves them out.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.edge.batch import ParquetFolder, RayOptions, result_from_row, score_archive
from helpers import write_archive

pytestmark = pytest.mark.ray
runner = CliRunner()


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_answers_of_one_process_and_a_rerun_adds_no_row(cluster, model, tmp_path):
    paths = write_archive(tmp_path / "studies", 4, zipped=1)
    corrupt = tmp_path / "studies" / "corrupt.zip"
    corrupt.write_bytes(paths[-1].read_bytes()[:5000])  # a zip cut short: its central directory is gone
    (tmp_path / "studies.txt").write_text("".join(f"studies/{p.name}\n" for p in [*paths, corrupt]))
    single = runner.invoke(app, ["predict", str(model), *map(str, paths), str(corrupt), "--study",
                                 "--json", str(tmp_path / "single.json")])
    assert single.exit_code == 1, single.output  # the corrupt zip has no answer
    expected = {s["input"]: s for s in json.loads((tmp_path / "single.json").read_text())["studies"]}
    command = ["predict", str(model), str(tmp_path / "studies.txt"), "--study", "--ray", "local", "--actors", "2",
               "--parquet", str(tmp_path / "out.parquet")]

    first = runner.invoke(app, [*command, "--json", str(tmp_path / "first.json")])
    assert first.exit_code == 1, first.output
    rows = [result_from_row(row).to_dict() for row in ParquetFolder(str(tmp_path / "out.parquet")).read().to_pylist()]
    assert sorted(r["input"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["input"]]
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-6) if want["error"] is None \
            else row["probability"] is None
        for key in set(row) - {"probability", "timings_s", "slices", "top_slices"}:
            assert row[key] == want[key], key
        for got, was in zip(row["slices"], want["slices"]):
            assert got["probability"] == pytest.approx(was["probability"], abs=1e-6) and got["index"] == was["index"]
    assert "unreadable zip archive" in next(r["error"] for r in rows if r["input"] == str(corrupt))
    run = json.loads((tmp_path / "first.json").read_text())
    assert (run["kind"], run["scored"], run["rows_written"], run["errors"], run["actors"]) == \
        ("archive_run", 5, 5, 1, 2)

    again = runner.invoke(app, [*command, "--json", str(tmp_path / "again.json")])
    assert again.exit_code == 1 and "nothing to score" in again.output  # the error row is still there
    run = json.loads((tmp_path / "again.json").read_text())
    assert (run["skipped"], run["rows_written"], run["parts_written"]) == (5, 0, 0)
    assert len(ParquetFolder(str(tmp_path / "out.parquet")).read()) == 5


def test_a_run_stopped_half_way_resumes_with_every_study_once(cluster, model, tmp_path):
    paths = write_archive(tmp_path, 6)
    inputs = [str(p) for p in paths]
    out = str(tmp_path / "out.parquet")

    def stop_after_two(event):  # what Ctrl-C or SIGTERM does to the CLI
        if event.done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_archive(model, inputs, out, ray_options=RayOptions(actors=1, studies_per_batch=1),
                      progress=stop_after_two)
    kept = ParquetFolder(out).read(["input"]).column("input").to_pylist()
    assert len(kept) == 2

    run = score_archive(model, inputs, out, ray_options=RayOptions(actors=2, studies_per_batch=1))
    assert (run.skipped, run.scored, run.rows_written, run.errors) == (2, 4, 4, 0)
    assert sorted(ParquetFolder(out).read(["input"]).column("input").to_pylist()) == sorted(inputs)
