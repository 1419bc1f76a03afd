"""Whole-study speed (issue 11): a synthetic 300-slice 512x512 CT series (plus a
scout) through the study pipeline (``ctedge.edge.study.bench_study``, stage split)
and through a fresh `ctedge predict --study` process, with EfficientNetB3 at 300 px.

    python benchmarks/study_speed.py            # writes benchmarks/results/study_speed.{json,md}

The model has random weights (benchmarks/make_b3.py; timing only) and lives with
the study in runs/bench-study/ (git-ignored). Each configuration is timed
--runs times in-process (stage split) and as a fresh `ctedge predict --study`
process (command start to the patient's answer); medians are reported. The
machine is shared, so compare the configurations within one run of this script.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_b3 import make_b3  # noqa: E402
from results_io import write_results

from ctedge.core.phantom_studies import fixed_uid, phantom_volume, write_scout, write_series  # noqa: E402
from ctedge.edge.study import STAGES, StudyOptions, bench_study  # noqa: E402

ENGINES = (("onnxruntime", "fp32"), ("openvino", "bf16"))  # fp32 baseline, the fastest variant here


def make_study(folder: Path, slices: int = 300, size: int = 512) -> Path:
    if folder.is_dir() and len(list(folder.iterdir())) >= slices:
        return folder
    rng = np.random.default_rng(0)
    uid = fixed_uid(rng)
    write_series(folder, phantom_volume(rng, slices, size, positive=True), rng, study_uid=uid,
                 patient_id="BENCH-0001", spacing=1.0)
    write_scout(folder, rng, uid, "BENCH-0001", size)
    return folder


def fresh_process(model: Path, study: Path, options: StudyOptions, provider: str, runtime: str,
                  precision: str, runs: int) -> dict:
    """Command start to the patient's answer: `ctedge predict --study` in a new process,
    ``runs`` times (the benchmark runs the CLI; the library never does)."""
    command = [sys.executable, "-m", "ctedge", "predict", str(model), str(study), "--study",
               "--max-slices", str(options.max_slices), "--aggregate", str(options.aggregate),
               "--provider", provider, "--runtime", runtime, "--precision", precision]
    if options.slice_step:
        command += ["--slice-step", str(options.slice_step)]
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed: {done.stderr[-500:]}")
    return {"runs": walls, "median": float(np.median(walls)), "command": " ".join(["ctedge", *command[3:]])}


def markdown(results: list[dict]) -> str:
    m = results[0]["machine"]
    lines = [f"# Whole-study speed (`benchmarks/study_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other work, so numbers are noisy; "
             f"compare rows of this one run), {m['platform']}, Python {m['python']}, onnxruntime "
             f"{m['onnxruntime']}. Model: EfficientNetB3 at {results[0]['input_size']} px, random weights, "
             "the fp32 ONNX file on each engine named in the first column. Study: one synthetic 300-slice 512x512 uncompressed axial "
             "series + a 2-image scout, shuffled file names. Medians of the runs shown.", "",
             "| engine | selection | slices used / sampled / total | headers+selection s | decode+preprocess s (CPU, "
             "threads) | waiting for decode s | inference s | aggregation s | pipeline wall s | "
             "in-process wall s | slices/s | pipeline / (used x batched per-slice) | fresh process: "
             "command start to answer s |", "|" + "---|" * 13]
    for r in results:
        d = r["median"]
        step = r["options"]["slice_step"]
        label = f"--slice-step {step}" if step else f"default (at most {r['options']['max_slices']}: every {d['slice_step']:.0f}.)"
        lines.append(f"| {r['runtime']} {r['precision']} | {label} | {d['slices_used']:.0f} / {d['slices_sampled']:.0f} / {d['slices_total']:.0f} | "
                     + " | ".join(f"{d[s]:.3f}" for s in STAGES)
                     + f" | {d['pipeline_wall_s']:.2f} | {d['wall_s']:.2f} | {d['slices_per_s']:.1f} | "
                     f"{d['target_ratio']:.2f} | {r['process_wall_s']['median']:.2f} |")
    if "load_average_1_5_15" in results[-1]:
        load = results[-1]["load_average_1_5_15"]
        lines += ["", f"Load average (1/5/15 min) before: {load['before']}, after: {load['after']}."]
    lines += ["", f"Batched inference alone (batch 8): {results[0]['per_slice_inference_s'] * 1000:.1f} ms per "
              f"slice; model load {results[0]['session_s']:.2f} s.", "",
              "Commands: " + "; ".join(f"`{r['process_wall_s']['command']}`" for r in results), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-study"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "study_speed")
    args = parser.parse_args()
    model = args.model or make_b3(args.work)
    study = make_study(args.work / "ct300")
    results = []
    load_before = os.getloadavg()
    for (runtime, precision), step in itertools.product(ENGINES, (None, 1)):
        options = StudyOptions(slice_step=step)
        report = bench_study(model, study, options, "cpu", None, args.runs, runtime=runtime, precision=precision)
        report["process_wall_s"] = fresh_process(model, study, options, "cpu", runtime, precision, args.runs)
        report["load_average_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
        results.append(report)
        print(json.dumps(report["median"]), report["process_wall_s"]["median"], flush=True)
    write_results(args.out, results, markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
