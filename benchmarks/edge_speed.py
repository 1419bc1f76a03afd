"""Edge inference benchmark: ORT fp32 / fp16 / INT8 recipes vs TF tf.function,
EfficientNetB3 at 300 px (native) and 224 px, all in one run on this machine.

    python benchmarks/edge_speed.py --data ../shared/data/covid-ct \
        --trained runs/b3-128/model.keras --out benchmarks/results

ONNX variants are timed in interleaved rounds (drift hits all alike), TF in a
separate process. Speed is measured on the architecture (random weights are as fast as trained
ones). INT8 accuracy needs a trained model: ``--trained`` is exported with each
INT8 recipe and scored on the labelled images of ``--data`` (val split when
``--split-dir`` is given). Targets are ratios within this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ctedge.edge.bench import BenchOptions, bench_files, bench_onnx, machine_info, stats_ms, time_calls  # noqa: E402
from ctedge.training.export import ExportOptions, export_onnx  # noqa: E402

INT8_RECIPES = {
    "qdq-per-channel": dict(int8_per_channel=True),
    "qdq-per-tensor": dict(int8_per_channel=False),
    "qdq-per-tensor-conv-only": dict(int8_per_channel=False, int8_ops=["Conv"]),
    "qoperator-per-tensor": dict(int8_per_channel=False, int8_format="qoperator"),
    "qdq-per-channel-reduce-range": dict(int8_per_channel=True, int8_reduce_range=True),
}


def random_model(size: int, folder: Path) -> Path:
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.model import ModelConfig, build_model

    path = folder / f"b3_{size}.keras"
    build_model(ModelConfig(weights="none"), PreprocessConfig(image_size=size)).save(path)
    return path


def export_all(model: Path, out: Path, data: str, recipes: dict) -> dict[str, Path]:
    """fp32 + fp16 once, then each INT8 recipe; returns variant name -> file."""
    files = {}
    report = export_onnx(model, out, ExportOptions(fp16=True, check_data=data, check_count=16,
                                                   fp16_tolerance=1.0))
    files["fp32"], files["fp16"] = Path(report["variants"]["fp32"]["file"]), Path(report["variants"]["fp16"]["file"])
    for name, recipe in recipes.items():
        target = out.with_name(f"{out.stem}_{name}.onnx")
        r = export_onnx(model, target, ExportOptions(int8=True, calibration_data=data, calibration_count=32,
                                                     check_data=data, check_count=16, int8_tolerance=1.0,
                                                     **recipe))
        files[f"int8 {name}"] = Path(r["variants"]["int8"]["file"])
    return files


def interleaved_latency(files: dict[str, Path], runs: int, rounds: int = 5) -> dict:
    """Batch-1 and batch-8 latency of every variant, measured in interleaved rounds
    (A B C A B C ...) so that drift on a shared machine hits all variants alike."""
    from ctedge.edge.runtime import Classifier

    sessions = {name: Classifier(path, "cpu") for name, path in files.items()}
    sessions["fp32, 1 thread"] = Classifier(files["fp32"], "cpu", threads=1)
    rng = np.random.default_rng(0)
    size = sessions["fp32"].size
    inputs = {b: rng.uniform(0, 255, (b, size, size, 3)).astype(np.float32) for b in (1, 8)}
    samples = {name: {1: [], 8: []} for name in sessions}
    for _ in range(rounds):
        for name, clf in sessions.items():
            for batch, x in inputs.items():
                samples[name][batch] += time_calls(lambda: clf.predict_arrays(x), 2, max(runs // rounds, 2), None)
    return {name: {"size_mb": files.get(name, files["fp32"]).stat().st_size / 1e6,
                   "latency": {str(b): {**stats_ms(v), "images_per_s": b / np.mean(v)} for b, v in per.items()}}
            for name, per in samples.items()}


def keras_baseline(model: Path, runs: int) -> dict:
    """TF tf.function latency in a fresh process, so TensorFlow's thread pools
    never share a process with the onnxruntime measurements."""
    code = ("import json, sys; from pathlib import Path; from ctedge.edge.bench import BenchOptions; from ctedge.training.keras_bench import bench_keras; "
            "r = bench_keras(Path(sys.argv[1]), BenchOptions(batch_sizes=[1, 8], runs=int(sys.argv[2]))); "
            "r.pop('samples_ms'); print('RESULT' + json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, str(model), str(runs)], capture_output=True, text=True,
                         check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}).stdout
    return json.loads(out.split("RESULT", 1)[1])


def speed(files: dict[str, Path], keras_model: Path, data: str, runs: int) -> dict:
    images, _, _ = bench_files(data, 16)
    results = interleaved_latency(files, runs)
    fp32 = bench_onnx(files["fp32"], "cpu", BenchOptions(batch_sizes=[1], runs=runs, data=data), images, None)
    results["fp32"].update({k: fp32[k] for k in ("inference_ms", "end_to_end_ms", "cold_start_ms")})
    results["tf.function"] = keras_baseline(keras_model, runs)
    return results


def accuracy(files: dict[str, Path], data: str, split_dir: str | None) -> dict:
    """AUC of each variant on the labelled val images (all images without split lists)."""
    from ctedge.core.data import DataOptions
    from ctedge.core.metrics import roc_auc
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.edge.runtime import Classifier
    from ctedge.training.export import engine_probabilities
    from ctedge.training.splits import load_data

    size = Classifier(files["fp32"], "cpu").size
    _, parts = load_data(DataOptions(root=data, split_dir=split_dir), PreprocessConfig(image_size=size),
                         parts=("val",))
    x, y = parts["val"].x, parts["val"].y
    return {name: {"auc": roc_auc(y, engine_probabilities("onnxruntime", path, x)), "images": int(len(y))}
            for name, path in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-dir")
    parser.add_argument("--trained", help="trained .keras model for the INT8 accuracy check")
    parser.add_argument("--sizes", default="300,224")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M"), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in map(int, args.sizes.split(",")):
            model = random_model(size, tmp)
            files = export_all(model, tmp / f"b3_{size}.onnx", args.data, INT8_RECIPES)
            results = speed(files, model, args.data, args.runs)
            fp32, tf = results["fp32"], results["tf.function"]
            report["sizes"][size] = {
                "results": {k: {kk: v[kk] for kk in ("size_mb", "latency", "inference_ms",
                                                     "end_to_end_ms", "cold_start_ms") if kk in v}
                            for k, v in results.items()},
                "ratios": {
                    "end_to_end_p50 / session.run_p50": fp32["end_to_end_ms"]["p50"] / fp32["inference_ms"]["p50"],
                    "ort_fp32 / tf.function (batch 1 p50)": fp32["latency"]["1"]["p50"] / tf["latency"]["1"]["p50"],
                    **{f"{k} / fp32 (batch 1 p50)": v["latency"]["1"]["p50"] / fp32["latency"]["1"]["p50"]
                       for k, v in results.items() if k not in ("fp32", "tf.function")},
                },
                "process_start_to_first_prediction_ms": fp32["cold_start_ms"]["process_to_first_prediction"],
            }
            print(json.dumps(report["sizes"][size]["ratios"], indent=2), flush=True)
        if args.trained:
            files = export_all(Path(args.trained), tmp / "trained.onnx", args.data, INT8_RECIPES)
            report["int8_accuracy"] = {"model": args.trained, **accuracy(files, args.data, args.split_dir)}
    (out / "edge_speed.json").write_text(json.dumps(report, indent=2))
    (out / "edge_speed.md").write_text(to_markdown(report))
    print((out / "edge_speed.md").read_text())


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Edge inference benchmark ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']} ({', '.join(m['available_providers'])}), default threads.", ""]
    for size, entry in report["sizes"].items():
        lines += [f"## {size} px", "", "| variant | MB | batch 1 p50 ms | batch 1 p99 ms | batch 8 images/s | "
                  "end-to-end p50 ms |", "|---|---|---|---|---|---|"]
        for name, r in entry["results"].items():
            e2e = r.get("end_to_end_ms", {}).get("p50")
            lines.append(f"| {name} | {r['size_mb']:.1f} | {r['latency']['1']['p50']:.1f} | "
                         f"{r['latency']['1']['p99']:.1f} | {r['latency']['8']['images_per_s']:.1f} | "
                         f"{'' if e2e is None else f'{e2e:.1f}'} |")
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in entry["ratios"].items()]
        lines += [f"| process start → first prediction (ms) | {entry['process_start_to_first_prediction_ms']:.0f} |", ""]
    if "int8_accuracy" in report:
        acc = report["int8_accuracy"]
        lines += [f"## Accuracy of each variant ({acc['model']})", "", "| variant | AUC | images |", "|---|---|---|"]
        lines += [f"| {k} | {v['auc']:.4f} | {v['images']} |" for k, v in acc.items() if isinstance(v, dict)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
