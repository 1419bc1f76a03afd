"""`ctedge predict --study --ray` and `ctedge evaluate --from-parquet`: an archive of
studies scored on Ray Data into a Parquet folder, and that folder scored against labels."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from ctedge.cli.common import check_outputs, clean, model_files, shown, verbose, write_text
from ctedge.cli.progress import Bars
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.core.progress import console
from ctedge.core.results import StudyEvaluation, dumps
from ctedge.edge.study import StudyOptions

RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", help="--study on Ray Data (pip install 'ctedge[ray]'): local (a cluster on this machine) or an "
                  "existing cluster's (auto on one of its nodes, or HEAD_IP:6379). Needs --parquet.")]
RayCpus = Annotated[int, typer.Option(help="--ray: CPUs per actor (its onnxruntime and decode threads).")]
Actors = Annotated[Optional[int], typer.Option(
    help="--ray: actors, one model each (default: the cluster's CPUs / --ray-cpus).")]
ParquetOut = Annotated[Optional[str], typer.Option(
    help="--ray: output folder of Parquet part files, one row per study (local or a URL); the same command again "
         "skips the inputs already there.")]

FOLDED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def reference(path: Path) -> str:
    """An input as typed: typer hands over a ``Path``, which folds a URL's ``//``
    (``s3://bucket/key`` arrives as ``s3:/bucket/key``); a local path stays as it is."""
    text = str(path)
    folded = FOLDED_URL.match(text)
    if folded is None or path.exists():
        return text
    scheme = folded.group(1)
    return f"{scheme}://{'/' if scheme.lower() == 'file' else ''}{text[folded.end():]}"


def _cleaned(bars: Bars):
    """The bars, with text from files (paths, errors) shown without control characters."""
    return lambda event: bars(replace(event, message=clean(event.message)) if event.message else event)


def predict_archive_command(model: Path, paths: list[Path], parquet: str | None, options: StudyOptions,
                            address: str | None, cpus_per_actor: int, actors: int | None, json_out: Path | None,
                            unsupported: dict[str, object], engine: dict) -> None:
    """`predict --study --ray`: the archive's answers into --parquet (resumable); exit 1
    when any of the inputs has an error row. ``unsupported``: flags given that --ray does
    not take; ``engine``: runtime, precision, provider, cache_dir."""
    from ctedge.edge.batch import RayOptions, score_archive

    if not address:
        raise CtedgeError("--parquet goes with --ray ADDRESS|local: an archive of studies on Ray Data")
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise CtedgeError(f"{', '.join(given)}: not with --ray (its answers go to --parquet; --json holds the run)")
    if not parquet:
        raise CtedgeError("--ray needs --parquet OUT.parquet (a folder of part files; a rerun resumes it)")
    check_outputs((json_out, "--json"), inputs=model_files(model))
    with Bars(rate="studies") as bars:
        run = score_archive(model, [reference(p) for p in paths], parquet, options,
                            RayOptions(address=address, cpus_per_actor=cpus_per_actor, actors=actors,
                                       verbose=verbose()), progress=_cleaned(bars),
                            **{**engine, "cache_dir": str(engine["cache_dir"]) if engine["cache_dir"] else None})
    startup = f", Ray start-up {run.ray_startup_s:.1f} s" if run.ray_startup_s is not None else ""
    rate = f"{run.studies_per_s:.2f} studies/s, " if run.studies_per_s else ""
    repeated = f"; {run.repeated} listed more than once" if run.repeated else ""
    console.print(shown(f"{run.scored} input(s) scored: {run.rows_written} studies, {run.errors_written} without an "
                        f"answer, in {run.seconds:.1f} s ({rate}{run.actors} actor(s) x {run.cpus_per_actor} CPU(s)"
                        f"{startup}); {run.skipped} already in {parquet}{repeated}" if run.scored else
                        f"nothing to score: the {run.inputs} input(s) are in {parquet} already{repeated}"))
    write_text(dumps(run), json_out)
    if run.errors:
        console.print(shown(f"{run.errors} stud(ies) of these inputs have no answer in {parquet} "
                            "(their rows hold the error)", "yellow"))
        raise typer.Exit(ExitCode.FAILED)


def evaluate_parquet_command(parquet: str | None, labels: Path | None, threshold: float | None, out: Path | None,
                             resamples: int, given: tuple[Path | None, Path | None]) -> StudyEvaluation:
    """`evaluate --from-parquet --labels`: patient-level metrics of an archive's answers
    (``given``: the MODEL and DATA arguments, which it does not take)."""
    import importlib.util

    from ctedge.cli.evaluate import print_study_report

    if not parquet and labels is None:
        raise CtedgeError("MODEL and DATA are needed (or --from-parquet OUT.parquet --labels labels.csv)")
    if not parquet or labels is None or any(given):
        raise CtedgeError("--from-parquet takes --labels and no MODEL or DATA: the archive's Parquet folder "
                          "holds the answers, labels.csv the truth")
    missing = [m for m in ("sklearn", "matplotlib", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise CtedgeError(f"evaluate --from-parquet needs {' and '.join(missing)} (not TensorFlow): "
                          "pip install 'ctedge[eval]' pyarrow")
    from ctedge.evaluation.archive import default_out, evaluate_parquet

    out = out or default_out(parquet)
    check_outputs((out, "--out", True), inputs=[labels])
    report = evaluate_parquet(parquet, labels, out, threshold, resamples)
    print_study_report(report)
    return report

