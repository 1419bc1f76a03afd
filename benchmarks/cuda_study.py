"""A whole 300-slice 512x512 phantom study on the CPU against CUDA fp32/fp16 (and
TensorRT when its libraries load), in the same run (issue 21).

    python benchmarks/cuda_study.py --model exports/b3-300.onnx   # -> benchmarks/results/cuda_study.{json,md}
    python benchmarks/cuda_study.py --cpu-only --model m.onnx --slices 24 --size 64 --out /tmp/smoke

Each run times every variant once, interleaved (so the machine's drift hits them
alike): the pipeline alone (``ctedge.edge.study.bench_study``: decode overlapped
with batched inference) and a fresh `ctedge predict --study` process (command
start to the patient's answer). The JSON holds one object per run with
``cpu_pipeline_s`` beside ``<provider>_<precision>_pipeline_s`` and the
``..._start_to_answer_s`` of each. A GPU variant whose provider falls back to the
CPU is recorded as skipped, never timed as if it ran on the GPU. ``--cpu-only``
is the smoke test of this script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results_io import write_results
from study_speed import fresh_process  # noqa: E402

from ctedge.core.phantom_studies import write_study  # noqa: E402
from ctedge.edge.study import StudyOptions, bench_study  # noqa: E402

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "tensorrt": "TensorrtExecutionProvider"}
GPU_VARIANTS = (("cuda", "fp32"), ("cuda", "fp16"), ("tensorrt", "fp32"), ("tensorrt", "fp16"))


def gpu_name() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip() or "no GPU found"
    except (OSError, subprocess.TimeoutExpired):
        return "nvidia-smi not found"


def time_variant(model: Path, study: Path, options: StudyOptions, provider: str, precision: str) -> dict:
    """One variant once: pipeline seconds and start-to-answer seconds, or why it was skipped."""
    try:
        report = bench_study(model, study, options, provider, None, 1, runtime="onnxruntime", precision=precision)
    except Exception as exc:  # a provider that fails to load is a result here, not a crash
        return {"skipped": f"{exc.__class__.__name__}: {exc}"}
    if report["provider"] != PROVIDER_NAMES[provider]:
        return {"skipped": f"fell back to {report['provider']}"}
    answer = fresh_process(model, study, options, provider, "onnxruntime", precision, 1)
    return {"pipeline_s": report["median"]["pipeline_wall_s"], "start_to_answer_s": answer["median"],
            "session_s": report["session_s"], "inference_s": report["median"]["inference"],
            "per_slice_batched_inference_s": report["per_slice_inference_s"],
            "slices_used": report["median"]["slices_used"], "machine": report["machine"]}


def run(model: Path, study: Path, options: StudyOptions, variants: list[tuple[str, str]], runs: int) -> list[dict]:
    rows = []
    skipped: dict[str, str] = {}
    for number in range(runs):
        row: dict = {"run": number + 1}
        for provider, precision in variants:
            key = f"{provider}_{precision}"
            if key in skipped:
                continue
            timed = time_variant(model, study, options, provider, precision)
            if "skipped" in timed:
                skipped[key] = timed["skipped"]
                continue
            row[f"{key}_pipeline_s"] = timed["pipeline_s"]
            row[f"{key}_start_to_answer_s"] = timed["start_to_answer_s"]
            row[f"{key}_session_s"] = timed["session_s"]
            row[f"{key}_inference_s"] = timed["inference_s"]
            row[f"{key}_per_slice_batched_inference_s"] = timed["per_slice_batched_inference_s"]
            row["slices_used"], row["machine"] = timed["slices_used"], timed["machine"]
        row["cpu_pipeline_s"] = row.get("cpu_fp32_pipeline_s")
        row["cpu_start_to_answer_s"] = row.get("cpu_fp32_start_to_answer_s")
        row["skipped"] = dict(skipped)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "machine"}), flush=True)
    return rows


def markdown(rows: list[dict], gpu: str, variants: list[tuple[str, str]], slices: int, size: int) -> str:
    m = rows[0].get("machine", {})
    lines = [f"# A whole study on the GPU (`benchmarks/cuda_study.py`, {time.strftime('%Y-%m-%d')})", "",
             f"GPU: {gpu}. CPU: {m.get('cpu', '?')}, {m.get('cores', '?')} cores. Study: a {slices}-slice "
             f"{size}x{size} phantom series (plus a scout), default sampling. Medians of {len(rows)} interleaved "
             "runs; ratio: pipeline seconds / the CPU's in the same runs (target <= 0.5).", "",
             "| variant | pipeline s | / CPU | start to answer s | model load s | inference in study s | "
             "batched inference ms/slice |", "|---|---|---|---|---|---|---|"]
    cpu = float(np.median([r["cpu_pipeline_s"] for r in rows]))
    for provider, precision in variants:
        key = f"{provider}_{precision}"
        if f"{key}_pipeline_s" not in rows[0]:
            lines.append(f"| {key} | skipped: {rows[-1]['skipped'].get(key, '?')} | | | | | |")
            continue
        med = {name: float(np.median([r[f"{key}_{name}"] for r in rows]))
               for name in ("pipeline_s", "start_to_answer_s", "session_s", "inference_s",
                            "per_slice_batched_inference_s")}
        lines.append(f"| {key} | {med['pipeline_s']:.2f} | {med['pipeline_s'] / cpu:.2f} | "
                     f"{med['start_to_answer_s']:.2f} | {med['session_s']:.2f} | {med['inference_s']:.2f} | "
                     f"{med['per_slice_batched_inference_s'] * 1000:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="fp32 .onnx (default: benchmarks/make_b3.py's)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-study"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpu-only", action="store_true", help="smoke test without a GPU: the CPU variant only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cuda_study")
    args = parser.parse_args()
    if args.model is None:
        from make_b3 import make_b3

        args.model = make_b3(args.work)
    variants = [("cpu", "fp32")]
    if not args.cpu_only:
        from cuda_speed import fp16_beside

        fp16_beside(args.model)
        variants += list(GPU_VARIANTS)
    options = StudyOptions()
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        write_study(study, np.random.default_rng(0), positive=True, slices=args.slices, size=args.size,
                    patient_id="BENCH-0001")
        rows = run(args.model, study, options, variants, args.runs)
    gpu = "none (--cpu-only)" if args.cpu_only else gpu_name()
    report = {"gpu": gpu, "model": str(args.model), "slices": args.slices, "size": args.size,
              "options": options.to_dict(), "runs": rows}
    write_results(args.out, report, markdown(rows, gpu, variants, args.slices, args.size))
    print(markdown(rows, gpu, variants, args.slices, args.size))


if __name__ == "__main__":
    main()
