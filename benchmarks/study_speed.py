"""Whole-study speed (issues 11, 29): a synthetic 300-slice 512x512 CT series (plus a
scout) through the study pipeline (``ctedge.edge.study.bench_study``, stage split)
and through a fresh `ctedge predict --study` process, with EfficientNetB3 at 300 px;
with ``--series DIR`` also a real DICOM series against the same series as one
.nii.gz (made from it with nibabel in the work folder), fresh processes both.

    python benchmarks/study_speed.py --series ../shared/data/ct-study/C3N-00247
                                                # writes benchmarks/results/study_speed.{json,md}
    python benchmarks/study_speed.py --baseline 15671a6   # fresh processes of that commit too, interleaved

The model has random weights (benchmarks/make_b3.py; timing only) and lives with
the study in runs/bench-study/ (git-ignored). Each configuration is timed
--runs times in-process (stage split) and as a fresh `ctedge predict --study`
process (command start to the patient's answer, wall and the process's CPU time);
medians are reported. Run it with nothing else on the cores: on a shared machine
compare the configurations within one run of this script only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from baseline import baseline_env, with_bytecode  # noqa: E402
from make_b3 import make_b3  # noqa: E402
from results_io import write_results

from ctedge.core.phantom_studies import fixed_uid, phantom_volume, write_scout, write_series  # noqa: E402
from ctedge.edge.engines import get_engine  # noqa: E402
from ctedge.edge.study import STAGES, StudyOptions, bench_study  # noqa: E402


def openvino_precision(model: Path) -> str:
    """OpenVINO's fastest float precision for ``model`` on this CPU, from the engine's own
    variant list: bf16 where the CPU has BF16 (AVX-512 BF16, AMX), else fp32."""
    offered = {precision for precision, _ in get_engine("openvino").variants(model, ["cpu"])}
    return "bf16" if "bf16" in offered else "fp32"


def engines(model: Path) -> tuple[tuple[str, str], ...]:
    """(runtime, precision) timed: onnxruntime fp32, the baseline, and OpenVINO's fastest here."""
    return ("onnxruntime", "fp32"), ("openvino", openvino_precision(model))


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
                  precision: str, runs: int, env: dict | None = None) -> dict:
    """Command start to the patient's answer: `ctedge predict --study` in a new process,
    ``runs`` times (the benchmark runs the CLI; the library never does): wall and CPU;
    ``env``: another commit's code (``baseline_env``)."""
    command = [sys.executable, "-m", "ctedge", "predict", str(model), str(study), "--study",
               "--max-slices", str(options.max_slices), "--aggregate", str(options.aggregate),
               "--provider", provider, "--runtime", runtime, "--precision", precision]
    if options.slice_step:
        command += ["--slice-step", str(options.slice_step)]
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(command)}` failed: {done.stderr[-500:]}")
    return {"runs": walls, "median": float(np.median(walls)), "cpu_runs": cpus, "cpu_median": float(np.median(cpus)),
            "command": " ".join(["ctedge", *command[3:]])}


def interleaved(jobs: dict[str, Callable[[], dict]], runs: int) -> dict[str, dict]:
    """Each job (a one-run ``fresh_process``) ``runs`` times, the jobs taking turns, so a
    change in the machine's speed shows in all of them alike; the runs merged per job."""
    rows: dict[str, list[dict]] = {name: [] for name in jobs}
    for _ in range(runs):
        for name, job in jobs.items():
            rows[name].append(job())
    merged = {}
    for name, done in rows.items():
        walls, cpus = [w for r in done for w in r["runs"]], [c for r in done for c in r["cpu_runs"]]
        merged[name] = {"runs": walls, "median": float(np.median(walls)), "cpu_runs": cpus,
                        "cpu_median": float(np.median(cpus)), "command": done[0]["command"]}
    return merged


HEADER_SCAN = """
import json, statistics, sys, time
import pydicom  # noqa: F401  (imported up front: the scan, not the import, is timed)
try:
    from ctedge.edge.study import find_studies, select_series
except ImportError:  # before the restructure (15671a6)
    from ctedge.study import find_studies, select_series
runs = []
for _ in range(int(sys.argv[2]) + 1):  # the first one warms the page cache and the lookups
    started = time.perf_counter()
    (study,) = find_studies(sys.argv[1])
    select_series(study)
    runs.append(time.perf_counter() - started)
print(json.dumps(runs[1:]))
"""


def header_scan(study: Path, runs: int, env: dict | None = None) -> list[float]:
    """``find_studies`` + ``select_series`` on ``study``, ``runs`` times in one fresh process
    after a warm-up (pydicom imported first), with ``env``'s code (``baseline_env``): the
    headers-and-selection row of issue 29."""
    done = subprocess.run([sys.executable, "-c", HEADER_SCAN, str(study), str(runs)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"the header scan of {study} failed: {done.stderr[-500:]}")
    return json.loads(done.stdout)


def header_scans(study: Path, runs: int, old_env: dict | None) -> dict:
    """Today's header scan and, with ``old_env``, the baseline's, in turns (``runs`` each)."""
    today: list[float] = []
    baseline: list[float] = []
    for _ in range(runs):
        today += header_scan(study, 3)
        if old_env:
            baseline += header_scan(study, 3, old_env)
    result = {"study": str(study), "runs": today, "median": float(np.median(today))}
    if old_env:
        result["baseline"] = {"runs": baseline, "median": float(np.median(baseline))}
    return result


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
    done = interleaved({name: functools.partial(fresh_process, model, path, options, "cpu", runtime, precision, 1)
                        for name, path in (("dicom", series), ("nifti", volume))}, runs)
    return {"series": str(series), "nifti": str(volume), "runtime": runtime, "precision": precision,
            "dicom_s": done["dicom"]["median"], "nifti_s": done["nifti"]["median"],
            "ratio": done["nifti"]["median"] / done["dicom"]["median"],
            "dicom_cpu_s": done["dicom"]["cpu_median"], "nifti_cpu_s": done["nifti"]["cpu_median"]}


def markdown(results: list[dict], nifti: dict | None = None, baseline: str | None = None,
             headers: dict | None = None) -> str:
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
             "threads) | waiting for decode s | inference s (its calls summed: they overlap) | aggregation s | "
             "pipeline wall s | in-process wall s | slices/s | pipeline / (used x per-slice alone) | fresh process: "
             "command start to answer s | its CPU s |" + (f" the same at {baseline} s |" if baseline else ""),
             "|" + "---|" * (15 if baseline else 14)]
    for r in results:
        d = r["median"]
        step = r["options"]["slice_step"]
        label = f"--slice-step {step}" if step else f"default (at most {r['options']['max_slices']}: every {d['slice_step']:.0f}.)"
        lines.append(f"| {r['runtime']} {r['precision']} | {label} | {d['slices_used']:.0f} / {d['slices_sampled']:.0f} / {d['slices_total']:.0f} | "
                     + " | ".join(f"{d[s]:.3f}" for s in STAGES)
                     + f" | {d['pipeline_wall_s']:.2f} | {d['wall_s']:.2f} | {d['slices_per_s']:.1f} | "
                     f"{d['target_ratio']:.2f} | {r['process_wall_s']['median']:.2f} | "
                     f"{r['process_wall_s']['cpu_median']:.2f} |"
                     + (f" {r['baseline_process_wall_s']['median']:.2f} |" if baseline else ""))
    if "load_average_1_5_15" in results[-1]:
        load = results[-1]["load_average_1_5_15"]
        lines += ["", f"Load average (1/5/15 min) before: {load['before']}, after: {load['after']}."]
    alone = {f"{r['runtime']} {r['precision']}": r for r in results}
    lines += ["", "Inference alone, per slice, called as the pipeline calls it (on the CPU single slices, as many "
              "at once as the engine serves): " + "; ".join(f"{name} {r['per_slice_inference_s'] * 1000:.1f} ms "
                                                           f"(model load {r['session_s']:.2f} s)"
                                                           for name, r in alone.items()) + ".", "",
              "Commands: " + "; ".join(f"`{r['process_wall_s']['command']}`" for r in results), ""]
    if baseline:
        lines += [f"The last column: commit {baseline}'s `src/` (`git archive`) as the same fresh command, run by "
                  "the same Python and packages through PYTHONPATH, its runs interleaved with today's; both with their "
                  "bytecode written, as an install has it.", ""]
    if headers:
        lines += [f"Headers and series selection alone (`find_studies` + `select_series` on `{headers['study']}`, "
                  "warm, in fresh processes taking turns, medians): "
                  f"**{headers['median']:.3f} s**" + (f" against {headers['baseline']['median']:.3f} s at {baseline} "
                                                      f"({headers['median'] / headers['baseline']['median']:.2f}x)"
                                                      if "baseline" in headers else "") + ".", ""]
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
    parser.add_argument("--baseline", metavar="REV", help="Also time this commit's `predict --study` (e.g. 15671a6, "
                                                          "before the restructure), interleaved, on this machine.")
    args = parser.parse_args()
    with_bytecode()
    commit, old_env = baseline_env(args.baseline, args.work) if args.baseline else (None, None)
    model = args.model or make_b3(args.work)
    study = make_study(args.work / f"ct{args.slices}-{args.size}", args.slices, args.size)
    timed_engines = engines(model)
    results = []
    load_before = os.getloadavg()
    for (runtime, precision), step in itertools.product(timed_engines, (None, 1)):
        options = StudyOptions(slice_step=step)
        report = bench_study(model, study, options, "cpu", None, args.runs, runtime=runtime, precision=precision)
        jobs = {"today": functools.partial(fresh_process, model, study, options, "cpu", runtime, precision, 1)}
        if commit:
            jobs["baseline"] = functools.partial(fresh_process, model, study, options, "cpu", runtime, precision, 1,
                                                 old_env)
        done = interleaved(jobs, args.runs)
        report["process_wall_s"] = done["today"]
        if commit:
            report["baseline_process_wall_s"] = {**done["baseline"], "commit": commit}
        report["load_average_1_5_15"] = {"before": load_before, "after": os.getloadavg()}
        results.append(report)
        print(json.dumps(report["median"]), report["process_wall_s"]["median"], flush=True)
    headers = header_scans(study, args.runs, old_env)
    nifti = args.series and nifti_against_dicom(model, args.series, args.work, *timed_engines[-1], args.runs)
    write_results(args.out, {"studies": results, "headers": headers, "nifti_against_dicom": nifti or None,
                             "baseline": commit}, markdown(results, nifti, commit, headers))
    print(markdown(results, nifti, commit, headers))


if __name__ == "__main__":
    main()
