"""Whole-study speed (issues 11, 29): a synthetic 300-slice 512x512 CT series (plus a
scout) through the study pipeline (``ctedge.edge.study.bench_study``, stage split)
and through a fresh `ctedge predict --study` process, with EfficientNetB3 at 300 px;
with ``--series DIR`` also a real DICOM series against the same series as one
.nii.gz (made from it with nibabel in the work folder), fresh processes both.

    python benchmarks/study_speed.py --series ../shared/data/ct-study/C3N-00247
                                                # writes benchmarks/results/study_speed.{json,md}

The model has random weights (benchmarks/make_b3.py; timing only) and lives with
the study in runs/bench-study/ (git-ignored). Each configuration is timed
--runs times in-process (stage split) and as a fresh `ctedge predict --study`
process (command start to the patient's answer, wall and the process's CPU time);
medians are reported. Run it with nothing else on the cores: on a shared machine
compare the configurations within one run of this script only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
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
    ``runs`` times (the benchmark runs the CLI; the library never does): wall and CPU."""
    command = [sys.executable, "-m", "ctedge", "predict", str(model), str(study), "--study",
               "--max-slices", str(options.max_slices), "--aggregate", str(options.aggregate),
               "--provider", provider, "--runtime", runtime, "--precision", precision]
    if options.slice_step:
        command += ["--slice-step", str(options.slice_step)]
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed: {done.stderr[-500:]}")
    return {"runs": walls, "median": float(np.median(walls)), "cpu_runs": cpus, "cpu_median": float(np.median(cpus)),
            "command": " ".join(["ctedge", *command[3:]])}


def as_nifti(series: Path, out: Path) -> Path:
    """A DICOM series as one .nii.gz (int16 HU, the slice positions' spacing), through
    ctedge's own reader, for the NIfTI-against-DICOM comparison."""
    import nibabel

    from ctedge.edge.study import find_studies, order_slices, select_series, slice_hu

    if out.is_file():
        return out
    (study,) = find_studies(series)
    chosen = select_series(study).series_uid
    ordered, positions, _ = order_slices(study.series[chosen])
    volume = np.stack([slice_hu(ref) for ref in ordered], axis=-1)  # rows, cols, slices
    spacing = float(np.median(np.diff(positions)))
    data = np.ascontiguousarray(np.transpose(volume, (1, 0, 2))[::-1, ::-1, :]).astype(np.int16)
    out.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(data, np.diag([1.0, 1.0, spacing, 1.0])), out)
    return out


def nifti_against_dicom(model: Path, series: Path, work: Path, runtime: str, precision: str, runs: int) -> dict:
    """Fresh `predict --study` on a DICOM folder and on the same series as .nii.gz, interleaved."""
    volume = as_nifti(series, work / f"{series.name}.nii.gz")
    options = StudyOptions()
    folder, nifti = [], []
    for _ in range(runs):
        folder.append(fresh_process(model, series, options, "cpu", runtime, precision, 1))
        nifti.append(fresh_process(model, volume, options, "cpu", runtime, precision, 1))
    median = {name: float(np.median([r["median"] for r in rows])) for name, rows in (("dicom", folder),
                                                                                       ("nifti", nifti))}
    return {"series": str(series), "nifti": str(volume), "runtime": runtime, "precision": precision,
            "dicom_s": median["dicom"], "nifti_s": median["nifti"], "ratio": median["nifti"] / median["dicom"],
            "dicom_cpu_s": float(np.median([r["cpu_median"] for r in folder])),
            "nifti_cpu_s": float(np.median([r["cpu_median"] for r in nifti]))}


def markdown(results: list[dict], nifti: dict | None = None) -> str:
    m, first = results[0]["machine"], results[0]
    load = first.get("load_average_1_5_15", {}).get("before")
    lines = [f"# Whole-study speed (`benchmarks/study_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, load average before {load}; {m['platform']}, Python "
             f"{m['python']}, onnxruntime {m['onnxruntime']}, OpenVINO {m.get('openvino')}. Model: `{first['model']}` "
             f"at {first['input_size']} px (benchmarks/make_b3.py: EfficientNetB3, random weights), the fp32 ONNX "
             f"file on each engine named in the first column. Study: `{first['study']}`, one synthetic "
             f"{first['median']['slices_total']:.0f}-slice uncompressed axial series + a 2-image scout, shuffled file "
             "names. Medians of the runs shown.", "",
             "| engine | selection | slices used / sampled / total | headers+selection s | decode+preprocess s (CPU, "
             "threads) | waiting for decode s | inference s | aggregation s | pipeline wall s | "
             "in-process wall s | slices/s | pipeline / (used x batched per-slice) | fresh process: "
             "command start to answer s | its CPU s |", "|" + "---|" * 14]
    for r in results:
        d = r["median"]
        step = r["options"]["slice_step"]
        label = f"--slice-step {step}" if step else f"default (at most {r['options']['max_slices']}: every {d['slice_step']:.0f}.)"
        lines.append(f"| {r['runtime']} {r['precision']} | {label} | {d['slices_used']:.0f} / {d['slices_sampled']:.0f} / {d['slices_total']:.0f} | "
                     + " | ".join(f"{d[s]:.3f}" for s in STAGES)
                     + f" | {d['pipeline_wall_s']:.2f} | {d['wall_s']:.2f} | {d['slices_per_s']:.1f} | "
                     f"{d['target_ratio']:.2f} | {r['process_wall_s']['median']:.2f} | "
                     f"{r['process_wall_s']['cpu_median']:.2f} |")
    if "load_average_1_5_15" in results[-1]:
        load = results[-1]["load_average_1_5_15"]
        lines += ["", f"Load average (1/5/15 min) before: {load['before']}, after: {load['after']}."]
    lines += ["", f"Batched inference alone (batch 8): {results[0]['per_slice_inference_s'] * 1000:.1f} ms per "
              f"slice; model load {results[0]['session_s']:.2f} s.", "",
              "Commands: " + "; ".join(f"`{r['process_wall_s']['command']}`" for r in results), ""]
    if nifti:
        lines += [f"A real series against itself as one .nii.gz ({nifti['runtime']} {nifti['precision']}, fresh "
                  f"processes, medians): DICOM folder {nifti['dicom_s']:.2f} s ({nifti['dicom_cpu_s']:.2f} s CPU), "
                  f".nii.gz {nifti['nifti_s']:.2f} s ({nifti['nifti_cpu_s']:.2f} s CPU): **{nifti['ratio']:.2f}x** "
                  f"(`{nifti['series']}`).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-study"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300, help="Slices of the synthetic series (smoke runs: fewer).")
    parser.add_argument("--size", type=int, default=512, help="Its rows and columns.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "study_speed")
    parser.add_argument("--series", type=Path, default=None,
                        help="A real DICOM series: also timed against itself as one .nii.gz.")
    args = parser.parse_args()
    model = args.model or make_b3(args.work)
    study = make_study(args.work / f"ct{args.slices}-{args.size}", args.slices, args.size)
    results = []
    load_before = os.getloadavg()
    for (runtime, precision), step in itertools.product(ENGINES, (None, 1)):
        options = StudyOptions(slice_step=step)
        report = bench_study(model, study, options, "cpu", None, args.runs, runtime=runtime, precision=precision)
        report["process_wall_s"] = fresh_process(model, study, options, "cpu", runtime, precision, args.runs)
        report["load_average_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
        results.append(report)
        print(json.dumps(report["median"]), report["process_wall_s"]["median"], flush=True)
    nifti = args.series and nifti_against_dicom(model, args.series, args.work, *ENGINES[-1], args.runs)
    write_results(args.out, {"studies": results, "nifti_against_dicom": nifti or None}, markdown(results, nifti))
    print(markdown(results, nifti))


if __name__ == "__main__":
    main()
