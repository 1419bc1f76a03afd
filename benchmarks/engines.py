"""Engines benchmark: onnxruntime vs OpenVINO (fp32, BF16, FP16, NNCF INT8 recipes),
thread settings and batch sizes, with accuracy on the shared val split.

    ctedge export MODEL.keras --onnx --openvino -o /tmp/x/b3.onnx \
        --calibration-data TRAIN_ONLY_DIR --check-data DATA
    python benchmarks/engines.py --model /tmp/x/b3.onnx --data ../shared/data/covid-ct \
        --split-dir ../shared/data/covid-ct/splits --out benchmarks/results

Every variant is timed in interleaved rounds (one call of each in turn), so the
load of a shared machine hits all alike; ratios to onnxruntime fp32 within this
one run are the figures to read. Accuracy: AUC with a 95% bootstrap CI on every
val image, and its change against onnxruntime fp32 on the same images. NNCF
recipes are calibrated (and accuracy-controlled) on train images only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ctedge.edge.bench import machine_info, process_start_ms, score, stats_ms, time_interleaved


def ort_session(path: Path, threads: int | None = None, spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0][:, 0]


def ov_compiled(model, hint: str = "f32", threads: int | None = None):
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model if not isinstance(model, Path) else str(model), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0][:, 0].copy()


def split_samples(data: str, split_dir: str, part: str):
    from ctedge.core.data import discover, split_from_lists

    return split_from_lists(discover(data), split_dir)[part]


def load_inputs(samples, size: int, window) -> tuple[np.ndarray, np.ndarray]:
    from ctedge.core.errors import CtedgeError
    from ctedge.core.imageio import read_image
    from ctedge.core.preprocess import to_model_input

    x, y = [], []
    for s in samples:
        try:
            x.append(to_model_input(read_image(s.path, window).gray, size))
            y.append(s.label)
        except CtedgeError:
            continue
    return np.stack(x), np.array(y)


def nncf_recipes(ir: Path, train_x: np.ndarray, train_y: np.ndarray, calibration: int, out: Path,
                 accuracy_control: bool) -> dict[str, Path]:
    """Extra NNCF INT8 IRs beside the export's default one: SE blocks kept in float,
    and (optionally) accuracy control against AUC on held-out train images."""
    import nncf
    import openvino as ov

    from ctedge.core.metrics import roc_auc

    rng = np.random.default_rng(1)
    order = rng.permutation(len(train_x))
    calib, held = order[:calibration], order[calibration:calibration + 128]
    dataset = nncf.Dataset(list(train_x[calib]), lambda image: image[None])
    found = {}
    model = ov.Core().read_model(str(ir))
    no_se = out / "int8_no_se.xml"
    if no_se.is_file() and no_se.stat().st_mtime > ir.stat().st_mtime:  # made from this IR already
        found["openvino int8 (SE blocks float)"] = (no_se, None)
    else:
        started = time.perf_counter()
        q = nncf.quantize(model, dataset, subset_size=len(calib),
                          ignored_scope=nncf.IgnoredScope(patterns=[".*_se_.*"], validate=False))
        found["openvino int8 (SE blocks float)"] = (no_se, time.perf_counter() - started)
        ov.save_model(q, str(no_se), compress_to_fp16=False)
    if accuracy_control:
        validation = nncf.Dataset([(train_x[i], train_y[i]) for i in held], lambda item: item[0][None])

        def validate(compiled, items) -> float:
            p = np.array([compiled(image)[0][0, 0] for image in items])
            return roc_auc(train_y[held], p)

        started = time.perf_counter()
        q = nncf.quantize_with_accuracy_control(
            ov.Core().read_model(str(ir)), dataset, validation, validate, max_drop=0.005,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
        found["openvino int8 (accuracy control, max AUC drop 0.005)"] = (out / "int8_ac.xml",
                                                                         time.perf_counter() - started)
        ov.save_model(q, str(found["openvino int8 (accuracy control, max AUC drop 0.005)"][0]),
                      compress_to_fp16=False)
    return found


ORT_OPENVINO_SNIPPET = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort
model, inputs, runs, batches, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
threads = int(sys.argv[6])
options = ort.SessionOptions()
extra = {}
if threads:
    options.intra_op_num_threads = threads
    extra = {"num_of_threads": str(threads)}
sessions = {
    "onnxruntime-openvino wheel: CPU EP fp32": ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]),
    "onnxruntime-openvino wheel: OpenVINO EP fp32": ort.InferenceSession(
        model, options, providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", "precision": "FP32", **extra})]),
    "onnxruntime-openvino wheel: OpenVINO EP bf16": ort.InferenceSession(
        model, options, providers=[("OpenVINOExecutionProvider", {"device_type": "CPU", **extra, "load_config":
                                    json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})})]),
}
names = list(sessions)
size = sessions[names[0]].get_inputs()[0].shape[1]
rng = np.random.default_rng(0)
report = {"version": ort.__version__, "providers": {n: s.get_providers()[0] for n, s in sessions.items()},
          "latency": {n: {} for n in names}}
for batch in map(int, batches.split(",")):
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    samples = {n: [] for n in names}
    for i in range(runs + 3):
        for n in names:
            t = time.perf_counter(); sessions[n].run(None, {"image": x}); dt = time.perf_counter() - t
            if i >= 3:
                samples[n].append(dt)
    for n in names:
        report["latency"][n][str(batch)] = {"p50": float(np.median(samples[n]) * 1000),
                                            "images_per_s": batch / float(np.mean(samples[n]))}
val = np.load(inputs)
report["outputs"] = {n: np.concatenate([s.run(None, {"image": val[i:i + 16]})[0][:, 0]
                                        for i in range(0, len(val), 16)]).tolist() for n, s in sessions.items()}
open(out, "w").write(json.dumps(report))
"""


def ort_openvino_ep(python: str, model: Path, val_x: np.ndarray, runs: int, batches: str, work: Path,
                    threads: int | None) -> dict:
    """onnxruntime's OpenVINO execution provider: its wheel (onnxruntime-openvino) owns
    the same `onnxruntime` package as onnxruntime, so it runs from its own environment;
    its CPU EP is timed in the same interleaved rounds as the reference."""
    import subprocess

    np.save(work / "val.npy", val_x)
    out = work / "ort_openvino.json"
    subprocess.run([python, "-c", ORT_OPENVINO_SNIPPET, str(model), str(work / "val.npy"), str(runs), batches,
                    str(out), str(threads or 0)], check=True, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="fp32 .onnx written by `ctedge export --onnx --openvino`")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-dir", required=True)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--calibration", type=int, default=200, help="train images for the NNCF recipes")
    parser.add_argument("--accuracy-control", action="store_true", help="also nncf.quantize_with_accuracy_control")
    parser.add_argument("--ort-openvino-python", help="python of a separate venv with onnxruntime-openvino")
    parser.add_argument("--threads", type=int, help="threads for every variant (default: each engine's own); "
                        "1 keeps ratios meaningful when other jobs oversubscribe the cores")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="engines", help="result files: OUT/NAME.md and OUT/NAME.json")
    args = parser.parse_args()
    from ctedge.edge.runtime import Classifier

    model = Path(args.model)
    ir = model.with_name(model.stem + "_ov.xml")
    ir_int8 = model.with_name(model.stem + "_ov_int8.xml")
    clf = Classifier(model, runtime="onnxruntime")
    val_x, val_y = load_inputs(split_samples(args.data, args.split_dir, "val"), clf.size, clf.window)
    train_x, train_y = load_inputs(split_samples(args.data, args.split_dir, "train"), clf.size, clf.window)
    work = model.parent / "engines-bench"
    work.mkdir(exist_ok=True)
    recipes = nncf_recipes(ir, train_x, train_y, args.calibration, work, args.accuracy_control)

    t = args.threads
    variants = {"onnxruntime fp32": ort_session(model, t)}
    if t is None:  # thread settings, compared with the default
        variants["onnxruntime fp32, 1 thread"] = ort_session(model, 1)
        variants["onnxruntime fp32, 2 threads, no spinning"] = ort_session(model, 2, spinning=False)
    variants.update({
        "openvino fp32": ov_compiled(ir, threads=t),
        "openvino bf16": ov_compiled(ir, "bf16", t),
        "openvino fp16": ov_compiled(ir, "f16", t),
        "openvino int8 (NNCF default, export --openvino)": ov_compiled(ir_int8, threads=t),
        "openvino int8 + bf16 for the float ops": ov_compiled(ir_int8, "bf16", t),
        **{name: ov_compiled(path, threads=t) for name, (path, _) in recipes.items()},
    })
    int8_ort = model.with_name(model.stem + "_int8.onnx")
    if int8_ort.is_file():
        variants["onnxruntime int8 (ctedge --int8 QDQ)"] = ort_session(int8_ort, t)
    names = list(variants)
    load = {"before": list(__import__("os").getloadavg())}
    rng = np.random.default_rng(0)
    latency = {name: {} for name in names}
    for batch in map(int, args.batch_sizes.split(",")):
        x = rng.uniform(0, 255, (batch, clf.size, clf.size, 3)).astype(np.float32)
        timed = time_interleaved([lambda f=variants[n], x=x: f(x) for n in names], 3, args.runs, None)
        for name, samples in zip(names, timed):
            latency[name][str(batch)] = {**stats_ms(samples), "images_per_s": batch / float(np.mean(samples))}
        print(f"batch {batch}: " + ", ".join(f"{n} {latency[n][str(batch)]['p50']:.1f}" for n in names), flush=True)

    load["after_timing"] = list(__import__("os").getloadavg())
    outputs = {n: np.concatenate([variants[n](val_x[i:i + 16]) for i in range(0, len(val_x), 16)]) for n in names}
    reference = outputs[names[0]]
    accuracy = {}
    for name in names:
        s = score(val_y, outputs[name], clf.threshold, 1000)
        s["auc_change"] = s["auc"] - accuracy.get(names[0], s)["auc"]
        s["max_abs_diff"] = float(np.max(np.abs(outputs[name] - reference)))
        accuracy[name] = s

    ep = None
    if args.ort_openvino_python:
        ep = ort_openvino_ep(args.ort_openvino_python, model, val_x, args.runs, args.batch_sizes, work, args.threads)
        cpu_name = "onnxruntime-openvino wheel: CPU EP fp32"
        for name, outs in ep.pop("outputs").items():
            p = np.asarray(outs)
            s = score(val_y, p, clf.threshold, 1000)
            s["auc_change"] = s["auc"] - accuracy[names[0]]["auc"]
            s["max_abs_diff"] = float(np.max(np.abs(p - reference)))
            ep.setdefault("accuracy", {})[name] = s
            ep.setdefault("ratio_to_its_cpu_ep", {})[name] = {
                b: ep["latency"][name][b]["p50"] / ep["latency"][cpu_name][b]["p50"] for b in ep["latency"][name]}

    image = next(p for p in sorted((Path(args.data) / "CT_COVID").iterdir()))
    starts = {}
    for label, runtime, precision in (("onnxruntime fp32", "onnxruntime", "fp32"),
                                      ("openvino bf16", "openvino", "bf16")):
        import tempfile

        with tempfile.TemporaryDirectory() as cache:
            empty = process_start_ms(model, image, "auto", runtime, precision, cache) if runtime == "openvino" else None
            warm = [process_start_ms(model, image, "auto", runtime, precision, cache) for _ in range(3)]
        starts[label] = {"empty_cache_ms": empty, "warm_cache_ms": float(np.median(warm)), "runs": warm}

    report = {"machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": str(model), "input_size": clf.size, "val_images": int(len(val_y)),
              "calibration": f"{min(args.calibration, len(train_x))} train-split images",
              "nncf_seconds": {n: t for n, (_, t) in recipes.items() if t is not None},
              "load_average_1_5_15_min": load, "runs": args.runs, "threads": args.threads or "each engine's default",
              "latency": latency, "accuracy": accuracy, "process_start": starts, "ort_openvino_ep": ep,
              "note": "shared 2-core machine: ratios within this run, not absolute figures, are what to compare"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{args.name}.md").write_text(to_markdown(report))
    print((out / f"{args.name}.md").read_text())


def _rate(latency: dict, batch: str) -> str:
    return f"{latency[batch]['images_per_s']:.1f}" if batch in latency else "not run"


def to_markdown(report: dict) -> str:
    m = report["machine"]
    names = list(report["latency"])
    base = report["latency"][names[0]]
    isa = ", ".join(k for k, v in m["isa"].items() if v)
    lines = [f"# Engines benchmark ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared with other jobs), ISA {isa}; "
             f"onnxruntime {m['onnxruntime']}, OpenVINO {m['openvino']}, Python {m['python']}. "
             f"EfficientNetB3 at {report['input_size']} px trained on the shared train split; accuracy on the "
             f"{report['val_images']} val images; NNCF calibration on {report['calibration']}. "
             f"All variants timed interleaved in one run ({report['runs']} rounds, threads per variant: "
             f"{report['threads']}); read the ratios. "
             f"Load average (1/5/15 min) before timing: {', '.join(f'{v:.1f}' for v in report['load_average_1_5_15_min']['before'])}, "
             f"after: {', '.join(f'{v:.1f}' for v in report['load_average_1_5_15_min']['after_timing'])} "
             "(other engineers' jobs on the same 2 cores).", "",
             "| variant | batch 1 p50 ms | / ORT fp32 | batch 8 img/s | batch 16 img/s | val AUC (95% CI) | AUC Δ | max abs Δp |",
             "|---|---|---|---|---|---|---|---|"]
    for n in names:
        lat, acc = report["latency"][n], report["accuracy"][n]
        lines.append(f"| {n} | {lat['1']['p50']:.1f} | {lat['1']['p50'] / base['1']['p50']:.2f} | "
                     f"{_rate(lat, '8')} | {_rate(lat, '16')} | "
                     f"{acc['auc']:.4f} ({acc['auc_ci'][0]:.3f}-{acc['auc_ci'][1]:.3f}) | {acc['auc_change']:+.4f} | "
                     f"{acc['max_abs_diff']:.1e} |")
    lines += ["", "| process start → first prediction (one PNG) | empty cache ms | warm cache ms |", "|---|---|---|"]
    for n, s in report["process_start"].items():
        empty = "" if s["empty_cache_ms"] is None else f"{s['empty_cache_ms']:.0f}"
        lines.append(f"| {n} | {empty} | {s['warm_cache_ms']:.0f} |")
    ep = report.get("ort_openvino_ep")
    if ep:
        lines += ["", f"onnxruntime's OpenVINO execution provider (onnxruntime-openvino {ep['version']}, its own "
                  "environment: it cannot be installed beside onnxruntime; ratios to that wheel's CPU EP, "
                  "interleaved in its own process):", "",
                  "| variant | batch 1 p50 ms | / its CPU EP | batch 8 img/s | val AUC | AUC Δ vs ORT fp32 |",
                  "|---|---|---|---|---|---|"]
        for n, lat in ep["latency"].items():
            acc = ep["accuracy"][n]
            lines.append(f"| {n} | {lat['1']['p50']:.1f} | {ep['ratio_to_its_cpu_ep'][n]['1']:.2f} | "
                         f"{_rate(lat, '8')} | {acc['auc']:.4f} | "
                         f"{acc['auc_change']:+.4f} |")
    if report["nncf_seconds"]:
        lines += ["", "NNCF time: " + "; ".join(f"{n} {t:.0f} s" for n, t in report["nncf_seconds"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
