"""`ctedge evaluate`, `audit`, `explain` and `report`: how good a model and its data are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ctedge.cli.common import (
    AggregateOpt,
    CacheDir,
    DataArg,
    GroupRegex,
    HtmlOut,
    ImageSize,
    JsonOut,
    MaxSlices,
    Positive,
    PrecisionOpt,
    ProviderOpt,
    Seed,
    SeriesOpt,
    SliceStep,
    SplitDir,
    TestFraction,
    Threads,
    TopK,
    ValFraction,
    check_outputs,
    clean,
    command,
    data_options,
    exit_if_failed,
    model_files,
    pixel_budget,
    print_file_rows,
    print_metrics,
    shown,
    study_options,
    verbose,
    write_json,
    write_text,
)
from ctedge.cli.progress import Bars
from ctedge.core.choices import Aggregate, EvalSplit
from ctedge.core.data import HASH_THRESHOLD, DataOptions
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.core.metrics import DEFAULT_RESAMPLES, DEFAULT_THRESHOLD
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.progress import console
from ctedge.core.results import ImageEvaluation, StudyEvaluation, dumps, plain
from ctedge.edge.engines import Provider, Runtime
from ctedge.edge.study import DEFAULT_MAX_SLICES, DEFAULT_TOP_K, StudyOptions


@command
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(
        help="Trained model (.keras); with --study the exported .onnx; none with --from-parquet.")] = None,
    data: Annotated[Optional[Path], typer.Argument(
        help="Data folder: one subfolder per class; none with --from-parquet.")] = None,
    split: Annotated[EvalSplit, typer.Option(help="Part of the data to score.")] = EvalSplit.val,
    threshold: Annotated[Optional[float], typer.Option(
        help=f"Decision threshold on P(positive) (default {DEFAULT_THRESHOLD}; with --study the model's metadata "
             "threshold).")] = None,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = DEFAULT_RESAMPLES,
    external: Annotated[bool, typer.Option(
        "--external", help="DATA is a separate test set: score every readable image in it "
                           "(automatic when no file there is one the model trained on).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default beside the model).")] = None,
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
    study: Annotated[bool, typer.Option("--study", help="DATA's class folders hold one study (DICOM folder, .zip "
                                        "or NIfTI) per patient: patient-level metrics of an exported .onnx "
                                        "model, CIs resampled by patient.")] = False,
    positive: Positive = None,
    series: SeriesOpt = None,
    slice_step: SliceStep = None,
    max_slices: MaxSlices = DEFAULT_MAX_SLICES,
    aggregate: AggregateOpt = Aggregate.topk,
    top_k: TopK = DEFAULT_TOP_K,
    runtime: Annotated[Runtime, typer.Option(help="--study: engine for the exported model (as predict).")
                       ] = Runtime.auto,
    precision: PrecisionOpt = None,
    provider: ProviderOpt = Provider.auto,
    threads: Threads = None,
    cache_dir: CacheDir = None,
    from_parquet: Annotated[Optional[str], typer.Option(
        help="Instead of MODEL and DATA: an archive's answers (`predict --study --ray --parquet`), scored against "
             "--labels.")] = None,
    labels: Annotated[Optional[Path], typer.Option(
        help="--from-parquet: CSV with a header: study_uid (or input) and label (class name, or 1/0).")] = None,
) -> None:
    """Accuracy, precision, sensitivity, specificity, F1 and AUC with bootstrap 95% CIs,
    confusion matrix, ROC and calibration plots.

    The split settings of the training run (config.json beside the model) are
    reused, so `val` means the same images (checked against the file hashes recorded
    at training; `--group-regex` groups the bootstrap only). On another data set
    every readable image is scored. Example:
    `ctedge evaluate runs/train-X/model.keras ../shared/data/covid-ct --split val`

    With `--study`, one answer per patient as `predict --study` gives it, scored
    against the class folder; `--split` does not apply (every study is scored):
    `ctedge evaluate exports/b3.onnx held-out-studies/ --study`

    With `--from-parquet`, an archive scored by `predict --study --ray`, per patient, against labels:
    `ctedge evaluate --from-parquet scores.parquet --labels labels.csv`
    """
    if from_parquet is not None or labels is not None or model is None or data is None:
        from ctedge.cli.archive import evaluate_parquet_command

        check_outputs((json_out, "--json"), (html_out, "--html"))
        report = evaluate_parquet_command(from_parquet, labels, threshold, out, resamples, given=(model, data))
        return write_evaluation(report, json_out, html_out, str(from_parquet), f"labels {labels}")
    default_out = model.parent / ("eval-studies" if study else f"eval-{split}")
    check_outputs((out or default_out, "--out", True), (json_out, "--json"), (html_out, "--html"),
                  inputs=[*model_files(model), data])
    if study:
        report = evaluate_studies_command(
            model, data, threshold, out, resamples, positive, study_options(
                series_uid=series, slice_step=slice_step, max_slices=max_slices, aggregate=aggregate, top_k=top_k),
            engine={"runtime": runtime, "precision": precision, "provider": provider, "threads": threads,
                    "cache_dir": str(cache_dir) if cache_dir else None})
    else:
        report = _evaluate_images(model, data, split, DEFAULT_THRESHOLD if threshold is None else threshold, out,
                                  resamples, split_dir, group_regex, external, positive)
    write_evaluation(report, json_out, html_out, str(model), f"data {data}")


def write_evaluation(report: ImageEvaluation | StudyEvaluation, json_out: Path | None, html_out: Path | None,
                     what: str, source: str) -> None:
    """--json and --html of an evaluation; exit 1 after them when studies got no answer."""
    write_text(dumps(report), json_out)
    if html_out:
        from ctedge.evaluation.report import evaluation_section, verdict, write_page

        write_page(html_out, f"ctedge evaluation: {what}", [verdict(report, None), evaluation_section(report)],
                   source)
        console.print(f"HTML page: {html_out}")
    if isinstance(report, StudyEvaluation) and report.failed:
        raise typer.Exit(ExitCode.FAILED)


def _evaluate_images(model: Path, data: Path, split: str, threshold: float, out: Path | None, resamples: int,
                     split_dir: Path | None, group_regex: str | None, external: bool, positive: str | None):
    """`evaluate MODEL.keras DATA`: the typed report, its table printed."""
    if model.suffix.lower() == ".onnx":
        raise CtedgeError(f"{model}: an .onnx model is evaluated on whole studies (--study, class folders "
                          "of studies); image-level evaluation takes the trained .keras model")
    from ctedge.evaluation.evaluate import evaluate as run_evaluation
    from ctedge.training.quiet import import_tensorflow

    import_tensorflow(verbose())
    with Bars() as bars:
        report = run_evaluation(model, data, split, threshold, out, resamples,
                                split_dir=str(split_dir) if split_dir else None, group_regex=group_regex,
                                external=external, positive=positive, progress=bars, max_pixels=pixel_budget())
    if report.external:
        console.print(f"{data} is not the training data: scored every readable image there "
                      f"({report.images}), no split, no shortcut baseline (no training set to fit it on)",
                      highlight=False, markup=False)
    print_metrics(report)
    console.print(f"plots and metrics.json in {report.out_dir}")
    return report


def evaluate_studies_command(model: Path, data: Path, threshold: float | None, out: Path | None,
                             resamples: int, positive: str | None, options: StudyOptions,
                             engine: dict | None = None) -> StudyEvaluation:
    """`evaluate --study`: patient-level metrics; failed studies named (exit 1 after the outputs)."""
    import importlib.util

    missing = [m for m in ("sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise CtedgeError(f"evaluate --study needs {' and '.join(missing)} (not TensorFlow): pip install 'ctedge[eval]'")
    from ctedge.evaluation.evaluate import evaluate_studies

    report = evaluate_studies(model, data, threshold, out, resamples, positive=positive, options=options,
                              **(engine or {}),
                              progress=lambda r: console.print(
                                  f"{escape(clean(r.input))}: " + (f"{r.probability:.3f}" if r.answered
                                                                   else f"[red]no answer[/] ({escape(clean(r.no_answer))})"),
                                  highlight=False))
    print_study_report(report)
    return report


def print_study_report(report: StudyEvaluation) -> None:
    """The metrics table, the warnings, the studies without an answer and where the files went."""
    print_metrics(report)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} of {report.studies + len(report.failed)} "
                      "stud(ies) got no answer and are not in the metrics:[/]")
        for item in report.failed:
            console.print(shown(f"  {item['input']}: {item['error']}"))
    console.print(f"plots, metrics.json and studies.csv in {report.out_dir}", markup=False)


@command
def audit(
    data: DataArg,
    positive: Positive = None,
    split_dir: SplitDir = None,
    group_regex: GroupRegex = None,
    seed: Seed = DataOptions.seed,
    test_fraction: TestFraction = DataOptions.test_fraction,
    val_fraction: ValFraction = DataOptions.val_fraction,
    image_size: ImageSize = PreprocessConfig.image_size,
    threshold: Annotated[int, typer.Option(help="Near-duplicate candidates: max differing bits of 64 (pHash).")
                         ] = HASH_THRESHOLD,
    show: Annotated[int, typer.Option(help="Rows of each list to print.")] = 10,
    json_out: JsonOut = None,
    html_out: HtmlOut = None,
) -> None:
    """Find leakage and shortcuts: near-duplicates within/across splits, annotated
    images, a metadata-only shortcut baseline, class balance, unreadable/small images.

    Exit code 0 when clean, 4 (LEAKAGE) when images are duplicated across splits,
    so CI can gate on it. Example:
    `ctedge audit ../shared/data/covid-ct --split-dir ../shared/data/covid-ct/splits`
    """
    from ctedge.evaluation.audit import LEAKAGE_MESSAGE, shortcut_finding
    from ctedge.evaluation.audit import audit as run_audit

    check_outputs((json_out, "--json"), (html_out, "--html"), inputs=[data])
    with Bars() as bars:
        report = run_audit(data_options(data, positive=positive, split_dir=split_dir, group_regex=group_regex,
                                        seed=seed, test_fraction=test_fraction, val_fraction=val_fraction),
                           image_size, threshold, bars)
    for split, b in report["balance"].items():
        if b["images"]:
            console.print(f"{split}: {b['images']} images, {b['positive']} positive "
                          f"({b['positive'] / b['images']:.0%})")
    pairs = report["near_duplicates"]
    console.print(f"[bold]near-duplicates[/] (≤ {threshold} bits): {len(pairs)} pair(s), "
                  f"{report['cross_split_duplicates']} across splits")
    for p in pairs[:show]:
        tag = "[red]CROSS-SPLIT[/]" if p["cross_split"] else "within " + p["splits"][0]
        console.print(f"  {tag} {p['bits']:2d} bits  {escape(clean(p['a']))}  ~  {escape(clean(p['b']))}",
                      highlight=False)
    console.print(f"[bold]annotated[/] (coloured marks): {len(report['annotated'])}")
    for path in report["annotated"][:show]:
        console.print(shown(f"  {path}"))
    console.print(f"smaller than {image_size} px: {len(report['too_small'])}; unreadable: {len(report['unreadable'])}")
    for item in report["unreadable"][:show]:
        console.print(shown(f"  {item['path']}: {item['reason']}"))
    baseline = report["shortcut_baseline"]
    for split in ("val", "test"):
        if split in baseline:
            loud, finding = shortcut_finding(split, baseline[split])
            console.print(f"[bold red]{escape(finding)}[/]" if loud else escape(finding), highlight=False)
    write_json(report, json_out)
    if html_out:
        from ctedge.evaluation.report import audit_section, verdict, write_page

        write_page(html_out, f"ctedge audit: {data}", [verdict(None, report),
                                                        audit_section(report, max_pixels=pixel_budget())],
                   f"split lists {split_dir}" if split_dir else "random split, seed " + str(seed))
        console.print(f"HTML page: {html_out}")
    if report["leakage"]:
        console.print(f"[bold red]{LEAKAGE_MESSAGE}[/]")
        raise typer.Exit(ExitCode.LEAKAGE)


@command(tensorflow=True)
def explain(
    model: Annotated[Path, typer.Argument(help="Trained model (.keras): Grad-CAM needs its gradients.")],
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the overlays.")] = Path("explained"),
    threshold: Annotated[float, typer.Option(help="Decision threshold written on each overlay.")
                         ] = DEFAULT_THRESHOLD,
    alpha: Annotated[float, typer.Option(help="Heatmap opacity at its hottest (0-1).")] = 0.5,
    sheet: Annotated[bool, typer.Option(help="Also write contact_sheet.png (the first 48 images) when there are several.")] = True,
    json_out: JsonOut = None,
) -> None:
    """Grad-CAM heatmaps for the positive class: where in each image the model
    found its evidence. Writes NAME.gradcam.png (the image, the heatmap over it
    and the probability above it) and a contact sheet.

    A file that can't be read gets an error row and the rest go on; exit code 1
    if any failed. Example:
    `ctedge explain runs/train-X/model.keras ../shared/data/covid-ct/CT_COVID --out explained`
    """
    from ctedge.core.imageio import expand_paths
    from ctedge.core.runconfig import RunConfig
    from ctedge.evaluation.explain import check
    from ctedge.evaluation.explain import explain as run_explain

    check(model, alpha)
    files = expand_paths(paths)
    if not files:
        raise CtedgeError(f"no image files found in {', '.join(map(str, paths))}")
    check_outputs((out, "--out", True), (json_out, "--json"), inputs=[*model_files(model), *files])
    config = RunConfig.load(model)
    positive = (config.positive if config else None) or "positive"
    with Bars() as bars:
        report = run_explain(model, files, out, threshold, positive, alpha, sheet=sheet, progress=bars,
                             max_pixels=pixel_budget())
    rows = report["explanations"]
    failed = print_file_rows(f"Grad-CAM for P({positive}), threshold {threshold}", rows, "overlay")
    if report["contact_sheet"]:
        console.print(f"contact sheet: {report['contact_sheet']}")
    write_json({**report, "explanations": [row.to_dict() for row in rows]}, json_out)
    exit_if_failed(failed, len(rows))


@command(tensorflow=True)
def report(
    run_dir: Annotated[Path, typer.Argument(
        help="Training run folder (model.keras + config.json) or tuning project (best_model.keras).")],
    data: Annotated[Optional[Path], typer.Option(help="Data folder (default: the one the run trained on).")] = None,
    split: Annotated[EvalSplit, typer.Option(help="Split to evaluate.")] = EvalSplit.val,
    explain_count: Annotated[int, typer.Option("--explain", help="Images to explain with Grad-CAM (0: none).")] = 12,
    run_audit: Annotated[bool, typer.Option("--audit/--no-audit", help="Include the data audit.")] = True,
    fresh: Annotated[bool, typer.Option(help="Recompute the evaluation and audit even if the run folder has them.")] = False,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = DEFAULT_RESAMPLES,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file (default RUN_DIR/report.html).")] = None,
    json_out: JsonOut = None,
    study: Annotated[bool, typer.Option("--study", help="--data holds class folders of studies: patient-level "
                                        "evaluation of the exported model (see evaluate --study).")] = False,
    onnx: Annotated[Optional[Path], typer.Option(help="--study: the exported model (default RUN_DIR/model.onnx).")] = None,
) -> None:
    """One self-contained HTML page for a training run or tuning project: data summary, audit
    findings, metrics with CIs, ROC (with the metadata shortcut's), confusion
    matrix, calibration and a grid of Grad-CAM explained images.

    Runs the evaluation, audit and Grad-CAM it needs, reusing eval-SPLIT/ and
    audit.json when the run folder already has them. Example:
    `ctedge report runs/train-X` then open runs/train-X/report.html;
    for patients: `ctedge report demo-study/run --study --data demo-study/studies/test`
    """
    from ctedge.evaluation.report import build

    check_outputs((out or run_dir / "report.html", "--out"), (json_out, "--json"))
    with Bars() as bars:
        result = build(run_dir, data, split, explain_count, run_audit, out, resamples, fresh, study, onnx, bars,
                       max_pixels=pixel_budget())
    print_metrics(result["evaluation"])
    audit = result["audit"]
    if audit:
        console.print(f"audit: {len(audit['near_duplicates'])} near-duplicate pair(s), "
                      f"{audit['cross_split_duplicates']} across splits; {len(audit['annotated'])} annotated")
    console.print(f"[green]report:[/] {escape(str(result['report']))}")
    write_json(plain(result), json_out)
