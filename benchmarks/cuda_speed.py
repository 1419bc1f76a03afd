"""ctedge on an NVIDIA GPU: onnxruntime's CPU, CUDA (fp32, fp16) and TensorRT
providers per image, and a whole 300-slice study, through ctedge's own bench.

    python benchmarks/cuda_speed.py --model exports/b3-300.onnx   # -> benchmarks/results/cuda_speed.{json,md}

Needs ``ctedge[cuda]`` (onnxruntime-gpu) and, for the fp16 variant when export did
not write one beside the model, onnxconverter-common. Images and the study are
synthetic phantoms (timing and CPU/GPU parity only; accuracy on them means
little). Every variant is timed interleaved in one process, so compare rows of
one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from results_io import write_results
from study_speed import fresh_process

from ctedge.core.phantom_studies import write_study
from ctedge.core.phantoms import make_dataset
from ctedge.edge.bench import BenchOptions, run_bench
from ctedge.edge.bench_report import markdown
from ctedge.edge.study import StudyOptions, bench_study


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "no GPU found"
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi not found"


def fp16_beside(model: Path) -> Path:
    """The export's fp16 variant file, written with export's own converter if missing."""
    from ctedge.training.export import to_fp16

    path = model.with_name(model.stem + "_fp16.onnx")
    if not path.is_file():
        proto = to_fp16(onnx.load(model))
        for prop in proto.metadata_props:
            if prop.key == "ctedge.variant":
                prop.value = json.dumps("fp16")
        onnx.save(proto, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--study-runs", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cuda_speed")
    args = parser.parse_args()
    fp16_beside(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_dataset(Path(tmp) / "images", per_class=32, size=512)
        options = BenchOptions(runtime="all", all_providers=True, data=str(images), runs=args.runs,
                               batch_sizes=[int(b) for b in args.batch_sizes.split(",")], save_choice=False)
        started = time.perf_counter()
        report = run_bench([args.model], options).to_dict()
        report["bench_seconds"] = time.perf_counter() - started
        print(markdown(report), flush=True)
        study = Path(tmp) / "study"
        write_study(study, np.random.default_rng(0), positive=True, slices=300, size=512, patient_id="BENCH-0001")
        report["studies"] = []
        for provider, precision, step in (("cpu", "fp32", None), ("cuda", "fp32", None), ("cuda", "fp16", None),
                                          ("cpu", "fp32", 1), ("cuda", "fp32", 1), ("cuda", "fp16", 1)):
            options = StudyOptions(slice_step=step)
            result = bench_study(args.model, study, options, provider, None, args.study_runs,
                                 runtime="onnxruntime", precision=precision)
            result["process_wall_s"] = fresh_process(args.model, study, options, provider, "onnxruntime",
                                                     precision, args.study_runs)
            report["studies"].append(result)
            print(provider, precision, json.dumps(result["median"]), result["process_wall_s"]["median"], flush=True)
    report["gpu"] = gpu_name()
    write_results(args.out, report, study_markdown(report))
    print(study_markdown(report))


def study_markdown(report: dict) -> str:
    lines = [f"# ctedge on an NVIDIA GPU (`benchmarks/cuda_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             f"GPU: {report['gpu']}.", "", markdown(report), "",
             "## One 300-slice study (512 x 512 DICOM, plus a scout), `ctedge predict --study`", "",
             "| provider | precision | selection | slices used / total | pipeline wall s | in-process wall s | "
             "fresh process: command start to answer s | model load s | batched inference ms/slice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["studies"]:
        d = r["median"]
        selection = "every slice" if r["options"]["slice_step"] == 1 else f"default (at most {r['options']['max_slices']})"
        lines.append(f"| {r['provider']} | {r['precision']} | {selection} | {d['slices_used']:.0f} / {d['slices_total']:.0f} | "
                     f"{d['pipeline_wall_s']:.2f} | {d['wall_s']:.2f} | {r['process_wall_s']['median']:.2f} | "
                     f"{r['session_s']:.2f} | {r['per_slice_inference_s'] * 1000:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
