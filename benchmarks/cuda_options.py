"""Which CUDA session settings make a whole study fast: fixed shapes (padding, warm-up)
and cuDNN's convolution search, against the same machine's CPU, one process.

    python benchmarks/cuda_options.py --model exports/b3-300.onnx   # -> benchmarks/results/cuda_options.{json,md}

Each row opens a fresh ``Classifier`` (session build and warm-up timed apart), then
classifies one synthetic 300-slice 512 x 512 study ``--runs`` times (the first run
apart: it pays what the warm-up did not). Rows: the CPU; CUDA as before this change
(no padding, cuDNN EXHAUSTIVE: a search per new batch shape); CUDA without padding,
HEURISTIC; CUDA padded to one shape, warmed up, EXHAUSTIVE (ctedge's default on a
GPU); the same at fp16; TensorRT padded (fp32, fp16) when its libraries load, with a
second start to show its engine cache. Rows whose provider is missing are skipped
with the reason. Needs ``ctedge[cuda]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import write_results

from ctedge.core.errors import CtedgeError
from ctedge.core.phantom_studies import write_study
from ctedge.edge.runtime import Classifier
from ctedge.edge.study import StudyOptions, predict_studies

# name, provider, precision, pad, provider options
ROWS = [("cpu", "cpu", "fp32", False, {}),
        ("cuda-before", "cuda", "fp32", False, {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
        ("cuda-heuristic", "cuda", "fp32", False, {}),
        ("cuda-fixed", "cuda", "fp32", True, {}),
        ("cuda-fixed-fp16", "cuda", "fp16", True, {}),
        ("tensorrt-fixed", "tensorrt", "fp32", True, {}),
        ("tensorrt-fixed-fp16", "tensorrt", "fp16", True, {})]


def time_row(model: Path, study: Path, provider: str, precision: str, pad: bool, options: dict, runs: int,
             cache: Path, batch: int) -> dict:
    """Session build, warm-up, first study and the median of the later ones for one setting."""
    started = time.perf_counter()
    clf = Classifier(model, provider, runtime="onnxruntime", precision=precision, provider_options=options,
                     pad=pad, fixed_batch=batch, cache_dir=str(cache))
    opened = time.perf_counter() - started
    if clf.device != provider:  # tensorrt without libnvinfer runs on CUDA: not this row
        raise CtedgeError(f"{provider} is not usable here (it would run on {clf.device})")
    walls = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        (result,) = predict_studies(clf, [study], StudyOptions(batch_size=batch))
        walls.append(time.perf_counter() - started)
        if result.error:
            raise CtedgeError(f"{study}: {result.error}")
    return {"engine": clf.engine_info.to_dict(), "open_s": opened, "session_s": clf.startup_s["session"],
            "warmup_s": clf.startup_s.get("warmup"), "first_study_s": walls[0],
            "study_median_s": statistics.median(walls[1:]), "studies_s": walls,
            "slices_used": result.slices_used, "probability": result.probability}


def markdown(report: dict) -> str:
    lines = [f"# CUDA session settings for a whole study (`benchmarks/cuda_options.py`, {report['date']})", "",
             f"Model {report['model']}, study of {report['slices']} slices, batch {report['batch']}, "
             f"median of {report['runs']} studies after the first.", "",
             "| setting | session s | warm-up s | first study s | study s (median) | / CPU | P |",
             "|---|---|---|---|---|---|---|"]
    cpu = report["rows"].get("cpu", {}).get("study_median_s")
    for name, row in report["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} | | | | | |")
            continue
        ratio = f"{row['study_median_s'] / cpu:.2f}" if cpu else ""
        warm = "" if row["warmup_s"] is None else f"{row['warmup_s']:.2f}"
        lines.append(f"| {name} | {row['session_s']:.2f} | {warm} | {row['first_study_s']:.2f} | "
                     f"{row['study_median_s']:.2f} | {ratio} | {row['probability']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--only", help="comma-separated row names (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cuda_options")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.only or r[0] in args.only.split(",")]
    report = {"model": str(args.model), "slices": args.slices, "batch": args.batch, "runs": args.runs,
              "date": time.strftime("%Y-%m-%d"), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        write_study(study, np.random.default_rng(0), positive=True, slices=args.slices, size=args.size,
                    patient_id="BENCH-0001")
        for name, provider, precision, pad, options in rows:
            try:
                report["rows"][name] = time_row(args.model, study, provider, precision, pad, options, args.runs,
                                                Path(tmp) / "cache", args.batch)
                if provider == "tensorrt":  # a second start: the engine comes from the cache
                    again = time_row(args.model, study, provider, precision, pad, options, 1, Path(tmp) / "cache",
                                     args.batch)
                    report["rows"][name]["second_start_open_s"] = again["open_s"]
            except CtedgeError as exc:
                report["rows"][name] = {"skipped": str(exc)}
            print(name, json.dumps({k: v for k, v in report["rows"][name].items() if k != "engine"}), flush=True)
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
