"""Archive speed (issue 27): the same generated studies scored in one process
(``predict_studies``, as `ctedge predict --study` runs them) and on a local Ray cluster
(``score_archive``, as `ctedge predict --study --ray local`) with 1 actor x all cores
and with one actor per core; studies/s, Ray's start-up and the overhead per study.

    python benchmarks/archive_speed.py          # writes benchmarks/results/archive_speed.{json,md}
    python benchmarks/archive_speed.py --model M.onnx --studies 3 --slices 16 --size 64 --out /tmp/smoke

The model is B3 at 300 px with random weights (benchmarks/make_b3.py; timing only)
unless --model names one; studies and model live in --work (git-ignored). Each run
starts a fresh Ray cluster (its start-up timed), scores into a fresh Parquet folder,
and the three configurations are timed in turn within a run; medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_b3 import make_b3  # noqa: E402
from results_io import write_results  # noqa: E402

from ctedge.core.phantom_studies import Anatomy, write_study  # noqa: E402
from ctedge.edge.batch import RayOptions, score_archive  # noqa: E402
from ctedge.edge.bench import machine_info  # noqa: E402
from ctedge.edge.runtime import Classifier  # noqa: E402
from ctedge.edge.study import StudyOptions, predict_studies  # noqa: E402


def make_studies(folder: Path, count: int, slices: int, size: int) -> list[Path]:
    """``count`` phantom patients (half positive), each its own study folder; kept between runs."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        study = folder / f"{size}px-{slices}sl" / f"P{i:04d}"
        if not study.is_dir():
            write_study(study, rng, positive=i % 2 == 0, slices=slices, size=size, patient_id=f"P{i:04d}",
                        anatomy=Anatomy.draw(rng))
        paths.append(study)
    return paths


def single_process(model: Path, studies: list[Path], options: StudyOptions) -> dict:
    """One process, every core: model load, then the studies one after another."""
    started = time.perf_counter()
    clf = Classifier(model)
    loaded = time.perf_counter()
    results = predict_studies(clf, studies, options)
    done = time.perf_counter()
    assert not any(r.error for r in results), [r.error for r in results if r.error]
    return {"load_s": loaded - started, "scoring_s": done - loaded, "wall_s": done - started,
            "studies_per_s": len(studies) / (done - loaded)}


def on_ray(model: Path, studies: list[Path], options: StudyOptions, actors: int, cpus: int) -> dict:
    """score_archive on the cluster this process holds, into a fresh Parquet folder."""
    out = tempfile.mkdtemp(prefix="ctedge-archive-bench-")
    try:
        started = time.perf_counter()
        run = score_archive(model, [str(s) for s in studies], os.path.join(out, "scores.parquet"), options,
                            RayOptions(actors=actors, cpus_per_actor=cpus))
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(out)
    assert run.rows_written == len(studies) and not run.errors, run
    return {"actors": actors, "cpus_per_actor": cpus, "scoring_s": run.seconds, "wall_s": wall,
            "studies_per_s": run.studies_per_s, "studies_per_batch": run.studies_per_batch}


def one_run(model: Path, studies: list[Path], options: StudyOptions, cores: int) -> dict:
    import ray

    single = single_process(model, studies, options)
    started = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - started
    try:
        configurations = [on_ray(model, studies, options, 1, cores), on_ray(model, studies, options, cores, 1)]
    finally:
        ray.shutdown()
    return {"single": single, "ray_startup_s": startup, "ray": configurations}


def summary(runs: list[dict], count: int) -> dict:
    """Medians over the runs; overhead per study: (Ray's scoring wall - one process's wall,
    model load included) / studies, Ray's cluster start-up left out (paid once per job)."""
    single = {key: float(np.median([r["single"][key] for r in runs])) for key in runs[0]["single"]}
    rows = []
    for i, config in enumerate(runs[0]["ray"]):
        scoring = float(np.median([r["ray"][i]["scoring_s"] for r in runs]))
        rows.append({"actors": config["actors"], "cpus_per_actor": config["cpus_per_actor"], "scoring_s": scoring,
                     "studies_per_s": count / scoring, "vs_single": (count / scoring) / single["studies_per_s"],
                     "overhead_per_study_s": (scoring - single["wall_s"]) / count})
    return {"single": single, "ray_startup_s": float(np.median([r["ray_startup_s"] for r in runs])), "ray": rows}


def markdown(report: dict) -> str:
    m, s, a = report["machine"], report["summary"], report["args"]
    lines = [f"# Archive speed (`benchmarks/archive_speed.py`, {report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']}, Ray {report['ray_version']}. Model: {report['model']}. {a['studies']} phantom "
             f"studies of {a['slices']} slices at {a['size']} px (default selection: at most 64 sampled), read "
             f"from local disk; medians of {a['runs']} run(s). Load average before/after: "
             f"{report['load_before']} / {report['load_after']}.", "",
             "| configuration | scoring s | studies/s | vs one process | overhead per study s |", "|---|---|---|---|---|",
             f"| one process, all cores (model load {s['single']['load_s']:.2f} s) | {s['single']['wall_s']:.2f} | "
             f"{s['single']['studies_per_s']:.2f} | 1.00 | - |"]
    for row in s["ray"]:
        lines.append(f"| Ray, {row['actors']} actor(s) x {row['cpus_per_actor']} CPU(s) | {row['scoring_s']:.2f} | "
                     f"{row['studies_per_s']:.2f} | {row['vs_single']:.2f} | {row['overhead_per_study_s']:+.3f} |")
    lines += ["", f"Ray cluster start-up (`ray.init`, local): {s['ray_startup_s']:.2f} s, once per job.",
              "Ray's scoring time includes starting the actors, loading the model in each and writing one "
              "Parquet part file per batch; one process's wall includes its model load.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-archive"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--slices", type=int, default=96)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "archive_speed")
    args = parser.parse_args()
    import ray

    model = args.model or make_b3(args.work)
    studies = make_studies(args.work, args.studies, args.slices, args.size)
    load_before = os.getloadavg()
    runs = []
    for n in range(args.runs):
        runs.append(one_run(model, studies, StudyOptions(), args.cores))
        print(f"run {n + 1}: {runs[-1]}", flush=True)
    report = {"machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M"), "model": str(model),
              "ray_version": ray.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in os.getloadavg()],
              "runs": runs, "summary": summary(runs, args.studies)}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
