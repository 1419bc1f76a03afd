"""`ctedge predict`: images or whole CT studies through an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from ctedge.cli.archive import Actors, ParquetOut, RayAddress, RayCpus
from ctedge.cli.common import (
    AggregateOpt,
    CacheDir,
    JsonOut,
    MaxSlices,
    Pad,
    PrecisionOpt,
    ProviderOpt,
    ProviderOptions,
    RuleOpt,
    SeriesOpt,
    SliceStep,
    Threads,
    TopK,
    check_outputs,
    clean,
    command,
    exit_if_failed,
    model_files,
    pixel_budget,
    plots_module,
    print_file_rows,
    provider_options,
    shown,
    study_options,
    write_csv,
    write_text,
)
from ctedge.cli.pull import (
    AeTitle,
    DicomWebToken,
    DicomWebUser,
    FromDicomWeb,
    FromPacs,
    MaxStudies,
    Query,
    pull_request,
)
from ctedge.core.choices import Aggregate
from ctedge.core.errors import CtedgeError, ExitCode, ModelFailed
from ctedge.core.progress import console
from ctedge.edge.engines import Provider, Runtime
from ctedge.edge.study import DEFAULT_MAX_SLICES, DEFAULT_TOP_K, SeriesRules, StudyOptions


@command
def predict(
    model: Annotated[Path, typer.Argument(help="Exported .onnx model (or OpenVINO IR .xml).")],
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders (searched recursively); "
                                                         "--study: studies (none with --from-*).")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Images per inference call (a study on a CPU: one slice per call, calls at once).")] = \
        StudyOptions.batch_size,
    runtime: Annotated[Runtime, typer.Option(
        help="Engine; auto: what `ctedge bench --runtime all` found fastest here, saved beside the model, "
             "else onnxruntime.")] = Runtime.auto,
    precision: PrecisionOpt = None,
    provider: ProviderOpt = Provider.auto,
    threads: Threads = None,
    cache_dir: CacheDir = None,
    provider_option: ProviderOptions = None,
    pad: Pad = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write rows as CSV ('-' for stdout).")] = None,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="Each path is a CT study (DICOM folder or .zip, "
                                        "or NIfTI): one answer per study (patient).")] = False,
    series: SeriesOpt = None,
    slice_step: SliceStep = None,
    max_slices: MaxSlices = DEFAULT_MAX_SLICES,
    aggregate: AggregateOpt = Aggregate.topk,
    top_k: TopK = DEFAULT_TOP_K,
    rule: RuleOpt = None,
    from_pacs: FromPacs = None,
    from_dicomweb: FromDicomWeb = None,
    query: Query = None,
    ae_title: AeTitle = "CTEDGE",
    max_studies: MaxStudies = None,
    dicomweb_token: DicomWebToken = None,
    dicomweb_user: DicomWebUser = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="--study: folder for one PNG per study (needs matplotlib).")] = None,
    ray: RayAddress = None,
    ray_cpus: RayCpus = 1,
    actors: Actors = None,
    parquet: ParquetOut = None,
) -> None:
    """Classify images with an exported model (no TensorFlow needed), on
    onnxruntime or OpenVINO.

    One row per image: path, probability of the positive class, label. A file
    that can't be read, or above the pixel budget (50 MP; `ctedge --max-pixels N predict ...`),
    gets an error row and the rest go on; exit code 1 if any failed.
    Example: `ctedge predict exports/b3.onnx scans/ --csv predictions.csv`;
    `ctedge predict exports/b3.onnx scans/ --runtime openvino --precision bf16`

    With `--study`, one row per CT study instead (see README, "Whole CT studies"):
    `ctedge predict exports/b3.onnx patient1/ patient2.zip --study --json studies.json`;
    pulled from a PACS: `ctedge predict exports/b3.onnx --study --from-pacs ORTHANC@pacs:4242`
    (or `--from-dicomweb http://pacs:8042/dicom-web`; `--query StudyDate=20261201-`);
    an archive on Ray Data: `--ray local --parquet scores.parquet` (README "Score an archive").
    """
    backend_options = provider_options(provider_option)
    paths = paths or []
    pull = pull_request(from_pacs, from_dicomweb, query, study=study, paths=paths, ae_title=ae_title,
                        max_studies=max_studies, max_bytes=study_options().max_bytes, token=dicomweb_token,
                        user=dicomweb_user)
    if study:
        options = study_options(series_uid=series, slice_step=slice_step, max_slices=max_slices,
                                aggregate=aggregate, top_k=top_k, batch_size=batch_size,
                                keep_thumbnails=plot is not None, rules=SeriesRules.from_pairs(rule or []))
        if ray or parquet:
            if pull is not None:
                raise CtedgeError("--ray scores study folders, zips, NIfTI or lists of them, not a PACS query")
            from ctedge.cli.archive import predict_archive_command

            return predict_archive_command(model, paths, parquet, options, ray, ray_cpus, actors, json_out, {
                "--csv": csv_out, "--plot": plot, "--threads": threads, "--pad": pad, "--provider-option": provider_option},
                {"runtime": runtime, "precision": precision, "provider": provider, "cache_dir": cache_dir})
        predict_studies_command(model, paths, options, provider, threads, csv_out, json_out, plot,
                                runtime=runtime, precision=precision, cache_dir=cache_dir,
                                provider_options=backend_options, pad=pad, pull=pull)
        return
    if ray or parquet:
        raise CtedgeError("--ray and --parquet go with --study: an archive of CT studies on Ray Data")
    _predict_images(model, paths, batch_size, csv_out, json_out, provider, threads, runtime=runtime,
                    precision=precision, cache_dir=cache_dir, provider_options=backend_options, pad=pad)


def _predict_images(model: Path, paths: list[Path], batch_size: int, csv_out: Path | None, json_out: Path | None,
                    provider, threads, **engine) -> None:
    """One row per image (the command without --study)."""
    from ctedge.core.imageio import expand_paths
    from ctedge.core.results import ImagePrediction, dumps
    from ctedge.edge.runtime import Classifier, predict_images

    files = expand_paths(paths)
    if not files:
        raise CtedgeError(f"no image files found in {', '.join(map(str, paths))}")
    check_outputs((csv_out, "--csv"), (json_out, "--json"), inputs=[*model_files(model), *files])
    cache_dir = engine.pop("cache_dir")
    clf = Classifier(model, provider, threads, cache_dir=str(cache_dir) if cache_dir else None,
                     fixed_batch=batch_size, max_pixels=pixel_budget(), **engine)
    result = predict_images(clf, model, files, batch_size)
    failed = print_file_rows(f"{model.name} on {clf.runtime} {clf.precision} ({clf.providers[0]}): "
                             f"P({clf.positive}), threshold {clf.threshold}", list(result.predictions), "label")
    for warning in result.warnings:
        console.print(Text.assemble(("warning:", "bold red"), " ", clean(warning)))
    write_csv([r.to_dict() for r in result.predictions], ImagePrediction.keys(), csv_out)
    write_text(dumps(result), json_out)
    exit_if_failed(failed, len(result.predictions))


def _print_study_details(results) -> None:
    from ctedge.edge.study import sampling_text

    for r in results:
        where = f"{r.input} (study {r.study_uid})" if r.study_uid else r.input
        if r.series_uid:
            console.print(shown(f"{where}: series {r.series_uid} ({r.series_description or 'no description'}), "
                                f"{sampling_text(r.slice_step)}: {r.slices_sampled} sampled, {r.slices_failed} failed, "
                                f"{r.slices_without_lung} without lung, {r.slices_used} classified"))
        for rejected in r.series_rejected:
            console.print(shown(f"  rejected series {rejected.series_uid} ({rejected.slices} file(s)): "
                                f"{rejected.reason}"))
        for warning in r.warnings:
            console.print(Text.assemble("  ", ("warning:", "yellow"), " ", clean(warning)))


def predict_studies_command(model: Path, paths: list[Path], options: StudyOptions, provider: str,
                            threads: int | None, csv_out: Path | None, json_out: Path | None, plot: Path | None, *,
                            runtime: str = "auto", precision: str | None = None,
                            cache_dir: Path | None = None, provider_options: dict[str, str] | None = None,
                            pad: bool | None = None, pull: tuple | None = None) -> None:
    """`predict --study`: one row per study, details below the table; exit 1 if any failed.
    ``pull``: (source, query) to pull the studies from a PACS instead of ``paths``."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from rich.table import Table

    from ctedge.core.results import dumps
    from ctedge.edge.runtime import load_in_background
    from ctedge.edge.study import CSV_FIELDS, STUDY_HINT, csv_row, predict_studies, studies_report

    check_outputs((csv_out, "--csv"), (json_out, "--json"), (plot, "--plot", True),
                  inputs=[*model_files(model), *paths])
    plots = plots_module("--plot") if plot is not None else None

    answered, failure = [], None

    def progress(r) -> None:
        answered.append(r)
        console.print(shown(f"{r.input}: {r.study_uid or '-'} done"))

    with ThreadPoolExecutor(1, thread_name_prefix="ctedge-load") as pool:  # the model loads while headers are read
        loading = load_in_background(pool, model, provider, threads, runtime=runtime, precision=precision,
                                     cache_dir=str(cache_dir) if cache_dir else None,
                                     provider_options=provider_options, pad=pad, fixed_batch=options.batch_size,
                                     max_pixels=options.max_pixels, hint=STUDY_HINT)
        try:
            results = (predict_studies(loading, paths, options, progress=progress) if pull is None
                       else _pulled(loading.result(), pull, options, progress))
        except (Exception, KeyboardInterrupt) as exc:  # the model failing (memory, a lost device), Ctrl-C or
            if not answered:                                # SIGTERM part way: keep the studies it answered
                raise
            results, failure = answered, exc
    clf = loading.result()
    table = Table(title=shown(f"{model.name} on {clf.runtime} {clf.precision} ({clf.providers[0]}): "
                               f"P({clf.positive}) per study, threshold {clf.threshold}, aggregate {options.aggregate}"))
    for column in ("input", "study", "patient", "slices used/total", "probability", "label"):
        table.add_column(column, overflow="fold")
    for r in results:
        outcome = shown(f"error: {r.error}", "red") if r.error else \
            shown(f"not eligible: {r.not_eligible}", "yellow") if r.not_eligible else shown(r.label)
        table.add_row(shown(r.input), shown(r.study_uid or "-"), shown(r.patient_id),
                      f"{r.slices_used}/{r.slices_total}", f"{r.probability:.4f}" if r.answered else "", outcome)
    console.print(table)
    _print_study_details(results)
    report = studies_report(clf, model, options, results)
    for warning in report.warnings:
        console.print(Text.assemble(("warning:", "bold red"), " ", clean(warning)))
    if failure is not None:  # --json says the run stopped short, not only the exit code
        cause = "interrupted" if isinstance(failure, KeyboardInterrupt) else \
            f"the model failed: {failure.__class__.__name__}: {failure}"
        stopped = f"stopped after {len(results)} stud(ies) ({cause}); the remaining inputs were not classified"
        report = replace(report, warnings=(*report.warnings, stopped))
    if plot is not None:
        written: set[Path] = set()
        for r in results:
            if r.answered:
                console.print(shown(f"plot: {plots.study_plot(r, plot, written)}"))
    write_csv([csv_row(r) for r in results], CSV_FIELDS, csv_out)
    write_text(dumps(report), json_out)
    if isinstance(failure, KeyboardInterrupt):
        console.print(shown(f"{stopped}; their rows are written", "yellow"))
        raise failure
    if failure is not None:
        raise ModelFailed(f"{stopped}; their rows are written")
    skipped = sum(r.not_eligible is not None for r in results)
    if skipped:
        console.print(f"[yellow]{skipped} of {len(results)} stud(ies) not eligible under the rules (--rule)[/]")
    failed = sum(r.error is not None for r in results)
    if failed:
        console.print(f"[yellow]{failed} of {len(results)} stud(ies) got no answer[/]")
        raise typer.Exit(ExitCode.FAILED)


def _pulled(clf, pull: tuple, options, progress) -> list:
    """The studies a PACS query finds, pulled one by one and classified (``pull``: (source, query))."""
    from ctedge.edge.pacs import pull_studies

    source, query = pull
    console.print(shown(f"{source.name}: studies matching {query}"))
    try:
        results = pull_studies(clf, source, query, options, progress=progress)
    finally:
        source.close()
    if not results:
        console.print(shown(f"{source.name}: no study matches {query}"))
    return results
