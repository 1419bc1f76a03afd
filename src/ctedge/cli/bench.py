"""`ctedge bench`: latency, throughput and accuracy per engine and precision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape

from ctedge.cli.common import (
    CacheDir,
    JsonOut,
    Pad,
    PrecisionOpt,
    ProviderOpt,
    ProviderOptions,
    Threads,
    check_outputs,
    command,
    model_files,
    pixel_budget,
    plots_module,
    provider_options,
    study_options,
    write_json,
    write_text,
)
from ctedge.core.choices import Split
from ctedge.core.errors import CtedgeError
from ctedge.core.progress import console
from ctedge.edge.bench import DEFAULT_BUDGET_MS, BenchOptions
from ctedge.edge.engines import BenchRuntime, Provider
from ctedge.edge.study import DEFAULT_MAX_SLICES


@command
def bench(
    models: Annotated[Optional[list[Path]], typer.Argument(
        help=".onnx or OpenVINO .xml (and .keras for a TF baseline) models; default: every .onnx in exports/.")] = None,
    runtime: Annotated[BenchRuntime, typer.Option(
        help="all: every runtime × precision × provider this machine has (saves the fastest within tolerance "
             "beside the model for --runtime auto).")] = BenchRuntime.onnxruntime,
    precision: PrecisionOpt = None,
    provider: ProviderOpt = Provider(BenchOptions.provider),
    all_providers: Annotated[bool, typer.Option(
        "--all-providers", help="Every onnxruntime provider this machine has, instead of --provider.")] = False,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = ",".join(
        map(str, BenchOptions().batch_sizes)),
    threads: Threads = None,
    provider_option: ProviderOptions = None,
    pad: Pad = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up calls.")] = BenchOptions.warmup,
    runs: Annotated[int, typer.Option(help="Timed calls per measure.")] = BenchOptions.runs,
    seconds: Annotated[Optional[float], typer.Option(help="Time each measure for S seconds instead of --runs.")] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Images (class folders give accuracy/AUC on all of them); default: generated.")] = None,
    split_dir: Annotated[Optional[Path], typer.Option(
        help="Official split lists: accuracy on --split of --data only.")] = None,
    split: Annotated[Split, typer.Option(help="Split for accuracy with --split-dir.")] = Split(BenchOptions.split),
    accuracy_images: Annotated[Optional[int], typer.Option(
        help="Score a seeded sample of N labelled images instead of all (stated in the report).")] = None,
    auc_tolerance: Annotated[float, typer.Option(
        help="A variant is within tolerance when |AUC - fp32 AUC| is at most this (labelled data).")
    ] = BenchOptions.auc_tolerance,
    cache_dir: CacheDir = None,
    save_choice: Annotated[bool, typer.Option(
        help="With --runtime all, write MODEL.runtime.json (the fastest within tolerance) for --runtime auto.")] = True,
    budget_ms: Annotated[float, typer.Option(help="End-to-end budget per image (the seed's 'few seconds').")
                         ] = DEFAULT_BUDGET_MS,
    markdown_out: Annotated[Optional[Path], typer.Option("--markdown", help="Write the table as markdown.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Latency histogram PNG (needs matplotlib).")] = None,
    json_out: JsonOut = None,
    study: Annotated[Optional[Path], typer.Option(
        help="Time one CT study (folder/.zip) end to end instead, split into stages.")] = None,
    slice_step: Annotated[Optional[int], typer.Option(
        help=f"--study: every Nth slice (default: at most {DEFAULT_MAX_SLICES}).")] = None,
    study_runs: Annotated[int, typer.Option(help="--study: timed runs (and fresh-process runs).")] = 3,
) -> None:
    """Latency, throughput, cold start, end-to-end time, accuracy/AUC with a 95% CI and
    size per model, runtime, precision and provider, with a verdict against the time
    budget. Variants are timed interleaved; accuracy changes are against fp32.

    Example: `ctedge bench exports/b3.onnx --runtime all --data ../shared/data/covid-ct
    --split-dir ../shared/data/covid-ct/splits --markdown bench.md`;
    for a whole study: `ctedge bench exports/b3.onnx --study patient1/ --json -`
    """
    from ctedge.edge.bench import run_bench

    check_outputs((markdown_out, "--markdown"), (plot, "--plot"), (json_out, "--json"),
                  inputs=[*(f for m in models or [] for f in model_files(m)), *filter(None, [data, study])])
    if plot is not None:
        plots_module("--plot")
    if study is not None:
        if runtime == "all":
            raise CtedgeError("--runtime all times images, not a study: give --study one runtime "
                              "(auto, onnxruntime or openvino)")
        bench_study_command(models or [], study, provider, threads, slice_step, study_runs, json_out,
                            runtime, precision, cache_dir,
                            engine_options={"provider_options": provider_options(provider_option), "pad": pad})
        return

    try:
        sizes = [int(b) for b in batch_sizes.split(",")]
    except ValueError:
        raise CtedgeError(f"--batch-sizes must be comma-separated integers, not {batch_sizes!r}") from None
    report = run_bench(models or [], BenchOptions(
        provider=provider, batch_sizes=sizes, threads=threads, warmup=warmup, runs=runs, seconds=seconds,
        data=str(data) if data else None, budget_ms=budget_ms,
        runtime=runtime, precision=precision, split_dir=str(split_dir) if split_dir else None, split=split,
        accuracy_images=accuracy_images, auc_tolerance=auc_tolerance,
        cache_dir=str(cache_dir) if cache_dir else None, save_choice=save_choice, all_providers=all_providers,
        provider_options=provider_options(provider_option), pad=pad, max_pixels=pixel_budget()),
        baselines=keras_baseline(models or []))
    write_outputs(report, markdown_out, plot, json_out)


def write_outputs(report, markdown_out: Path | None, plot: Path | None, json_out: Path | None) -> None:
    """The console table, then --markdown, --plot and --json."""
    from ctedge.core.results import dumps
    from ctedge.edge.bench_report import markdown

    print_report(report)
    write_text(markdown(report), markdown_out)
    if plot:
        plots_module("--plot").latency_histogram({f"{Path(r.model).name} {r.format} {r.provider}": np.asarray(r.samples_ms)
                           for r in report.results}, plot)
    write_text(dumps(report), json_out)

def print_report(report) -> None:
    """The console table, ISA line, warnings, budget verdicts and the fastest variant."""
    from rich.table import Table

    from ctedge.edge.bench_report import budget_line, closing_lines, isa_line, table_rows

    m = report.machine
    engines = ", ".join(filter(None, [m["onnxruntime"] and f"onnxruntime {m['onnxruntime']}",
                                      m["openvino"] and f"OpenVINO {m['openvino']}"]))
    table = Table(title=f"{m['cpu']}, {m['cores']} cores, {engines}")
    shown = {"model": "model", "format": "runtime", "provider": "provider", "batch": "batch",
             "p50 ms": "p50 ms", "p99 ms": "p99 ms", "/ fp32": "/fp32", "images/s": "img/s",
             "end-to-end p50 ms": "e2e p50 ms", "cold start ms": "cold ms", "AUC": "AUC (95% CI) n",
             "AUC Δ": "AUC Δ"}  # row key -> short console header
    for header in shown.values():
        table.add_column(header, justify="right")
    for row in table_rows(report):
        table.add_row(*[row[c].replace("ExecutionProvider", "") for c in shown])
    console.print(table)
    console.print(isa_line(m), highlight=False)
    if report.accuracy_data:
        console.print(f"accuracy on {report.accuracy_data}", highlight=False)
    for r in report.to_dict()["results"]:
        if r["constant_warning"]:
            console.print(f"[bold red]warning:[/] {Path(r['model']).name}: {r['constant_warning']}",
                          highlight=False)
        if r["budget"]:
            within, line = budget_line(r)
            console.print(f"[{'green' if within else 'red'}]{escape(line)}[/]", highlight=False)
    for line in closing_lines(report):
        console.print(f"[bold]{escape(line)}[/]", highlight=False)


def bench_study_command(models: list[Path], study: Path, provider: str, threads: int | None,
                        slice_step: int | None, runs: int, json_out: Path | None, runtime: str = "auto",
                        precision: str | None = None, cache_dir: Path | None = None,
                        engine_options: dict | None = None) -> None:
    """`bench --study`: stage split and slices/s of one study per model (median of the
    runs); --json holds one report per model."""
    from ctedge.edge.bench import find_models
    from ctedge.edge.study import bench_study

    if runtime == "all":
        raise CtedgeError("--study times one engine: pick --runtime onnxruntime, openvino or auto, not all",
                          param="runtime")
    options = study_options(slice_step=slice_step)
    reports = []
    for model in find_models(models):
        report = bench_study(model, study, options, provider, threads, runs, runtime=runtime, precision=precision,
                             cache_dir=str(cache_dir) if cache_dir else None, **(engine_options or {}))
        _print_study_bench(model, report, runs)
        reports.append(report)
    write_json({"reports": reports}, json_out)


def _print_study_bench(model: Path, report: dict, runs: int) -> None:
    from rich.table import Table

    from ctedge.edge.study import STAGES, TARGET_RATIO

    m, med = report["machine"], report["median"]
    table = Table(title=escape(f"{model.name} on {report['runtime']} {report['precision']} ({report['provider']}), "
                               f"{m['cpu']}, {m['cores']} cores: {med['slices_used']:.0f} of "
                               f"{med['slices_total']:.0f} slices (1 in {med['slice_step']:.0f}), median of {runs}"))
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage in STAGES + ("pipeline_wall_s", "wall_s"):
        table.add_row(stage + (" (calls summed)" if stage == "inference" else ""), f"{med[stage]:.3f}")
    console.print(table)
    console.print(f"{med['slices_per_s']:.1f} slices/s; pipeline wall / (slices used x "
                  f"{report['per_slice_inference_s'] * 1000:.1f} ms a slice of inference alone) = "
                  f"{med['target_ratio']:.2f} (target <= {TARGET_RATIO}); model load {report['session_s']:.2f} s "
                  "(fresh-process start to answer: benchmarks/study_speed.py)", highlight=False)


def keras_baseline(models: list[Path]) -> dict:
    """A .keras model is timed by the TensorFlow baseline (training stack, imported only then)."""
    if not any(m.suffix == ".keras" for m in models):
        return {}
    from ctedge.training.keras_bench import bench_keras

    return {".keras": bench_keras}
