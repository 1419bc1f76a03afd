"""`ctedge bench`: latency, throughput, cold start, end-to-end and accuracy per
model, runtime (onnxruntime, OpenVINO), precision and provider.

TensorFlow-free for ONNX/IR models; a ``.keras`` model adds a TF ``tf.function``
baseline in the same run (TensorFlow imported only then). Variants of one model
are timed interleaved (one call of each in turn), so a noisy shared machine
slows them alike; accuracy is measured on every labelled image given, with a
bootstrap CI, and compared with the model's fp32 run on the same images.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write
from ctedge.core.imageio import DEFAULT_MAX_PIXELS
from ctedge.core.metrics import DEFAULT_RESAMPLES
from ctedge.core.results import BenchReport, BenchRow
from ctedge.edge import engines

DEFAULT_BUDGET_MS = 2000.0  # the seed paper's "within a few seconds", end to end


@dataclass(kw_only=True)
class BenchOptions:
    provider: str = "cpu"  # a Provider: onnxruntime cpu | cuda | tensorrt | auto; OpenVINO cpu | gpu | npu | auto
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 16])
    threads: int | None = None
    warmup: int = 3
    runs: int = 20
    seconds: float | None = None
    data: str | None = None
    files: int = 16  # images for the end-to-end measure (max)
    budget_ms: float = DEFAULT_BUDGET_MS
    process_start: bool = True
    runtime: str = "onnxruntime"  # auto | onnxruntime | openvino | all
    precision: str | None = None  # None: fp32 (with --runtime all: every precision the engine has here)
    split_dir: str | None = None  # with split: accuracy on that split of --data only
    split: str = "val"
    accuracy_images: int | None = None  # None: every labelled image given
    auc_tolerance: float = 0.005  # |AUC change| vs fp32 for "within tolerance"
    probability_tolerance: float = 0.05  # max |Δp| vs fp32 when there are no labels
    resamples: int = DEFAULT_RESAMPLES
    cache_dir: str | None = None  # engine cache (OpenVINO compiled models, onnxruntime CPU graphs)
    save_choice: bool = True  # --runtime all: write MODEL.runtime.json for runtime="auto"
    all_providers: bool = False  # every onnxruntime provider this machine has, instead of ``provider``
    provider_options: dict[str, str] = field(default_factory=dict)  # KEY=VALUE for the device's backend
    pad: bool | None = None  # one batch shape per call (None: on a GPU)
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixel budget of every image read (ctedge --max-pixels)

    def check(self) -> None:
        runtimes = engines.BenchRuntime.values()
        if self.runtime not in runtimes:
            raise CtedgeError(f"must be {', '.join(runtimes)}, not {self.runtime!r}", param="runtime")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise CtedgeError(f"must be positive integers, not {self.batch_sizes}", param="batch_sizes")
        if self.accuracy_images is not None and self.accuracy_images < 2:
            raise CtedgeError(f"must be at least 2, not {self.accuracy_images}", param="accuracy_images")
        if self.split_dir and not self.data:
            raise CtedgeError("needs data (the class folders the lists name)", param="split_dir")


@dataclass(frozen=True)
class Variant:
    runtime: str
    precision: str
    provider: str


def machine_info(threads: int | None) -> dict:
    """CPU, cores, ISA features, and each installed engine's version and devices: part of every report."""
    info = {"cpu": engines.cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "isa": engines.isa_features(), "threads": threads or "default",
            "engines": {}}
    for name in engines.engine_names():
        if engines.installed(name):
            info["engines"][name] = engines.get_engine(name).about()
    # the earlier top-level keys, kept for readers of older reports
    ort_info, ov_info = info["engines"].get("onnxruntime", {}), info["engines"].get("openvino", {})
    info.update(onnxruntime=ort_info.get("version"), available_providers=ort_info.get("available_providers", []),
                openvino=ov_info.get("version"))
    if ov_info:
        info["openvino_cpu_capabilities"] = ov_info.get("cpu_capabilities")
    return info


def stats_ms(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"min": float(ms.min()), "mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "runs": int(len(ms))}


def time_calls(call, warmup: int, runs: int, seconds: float | None) -> list[float]:
    """Wall time of ``call()`` after warm-up, for ``runs`` calls or ``seconds``."""
    return time_interleaved([call], warmup, runs, seconds)[0]


def time_interleaved(calls: list, warmup: int, runs: int, seconds: float | None) -> list[list[float]]:
    """Wall time of each call, one call of each in turn per round, so load on a
    shared machine hits every variant alike; ``runs`` rounds or ``seconds`` each."""
    for _ in range(warmup):
        for call in calls:
            call()
    samples: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + seconds * len(calls) if seconds else None
    while (len(samples[0]) < runs) if deadline is None else (time.perf_counter() < deadline or not samples[0]):
        for call, out in zip(calls, samples):
            started = time.perf_counter()
            call()
            out.append(time.perf_counter() - started)
    return samples


def _readable(path: Path, max_pixels: int) -> bool:
    from ctedge.core.imageio import read_image

    try:
        read_image(path, max_pixels=max_pixels)
        return True
    except CtedgeError:
        return False


def bench_files(data: str | None, count: int, folder: Path | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[Path], np.ndarray | None, str]:
    """Image files for end-to-end timing and accuracy: a labelled data folder (its
    images within ``max_pixels``), a flat folder, or generated phantom PNGs written
    to ``folder`` (the caller's temporary folder, which it removes)."""
    import cv2

    from ctedge.core.data import pick_samples
    from ctedge.core.phantoms import phantom

    if data:
        chosen, labelled = pick_samples(data, count)
        readable = [s for s in chosen if _readable(s.path, max_pixels)]
        if not readable:
            raise CtedgeError(f"none of the {len(chosen)} images picked from {data} can be read")
        labels = np.array([s.label for s in readable]) if labelled else None
        skipped = f", {len(chosen) - len(readable)} unreadable skipped" if len(readable) < len(chosen) else ""
        return [s.path for s in readable], labels, f"{len(readable)} images from {data}{skipped}"
    if folder is None:
        raise ValueError("bench_files needs a folder for the generated phantoms")
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        files.append(folder / f"phantom_{i}.png")
        cv2.imwrite(str(files[-1]), phantom(rng, 512, bool(i % 2)))
    # phantom labels mean nothing to a model trained on real scans: no accuracy
    return files, None, f"{count} generated 512 px phantoms (timing only)"


def accuracy_files(options: BenchOptions) -> tuple[list[Path], np.ndarray, str] | None:
    """Every labelled image of --data (its --split with --split-dir), or a stated
    seeded sample of --accuracy-images; None without class folders."""
    from ctedge.core.data import discover, split_from_lists

    if not options.data:
        return None
    try:
        dataset = discover(options.data)
    except CtedgeError:
        if options.split_dir:
            raise
        return None  # a flat folder: timing only
    samples, where = dataset.samples, f"{options.data}"
    if options.split_dir:
        parts = split_from_lists(dataset, options.split_dir)
        if options.split not in parts or not parts[options.split]:
            raise CtedgeError(f"{options.split!r}: no images of {options.data} in that split "
                              f"of {options.split_dir}", param="split")
        samples, where = parts[options.split], f"the {options.split} split of {options.data}"
    total = len(samples)
    if options.accuracy_images and options.accuracy_images < total:
        chosen = np.random.default_rng(0).choice(total, options.accuracy_images, replace=False)
        samples = [samples[i] for i in sorted(chosen)]
        where = f"a seeded sample of {len(samples)} of the {total} images of {where}"
    else:
        where = f"all {total} images of {where}"
    return [s.path for s in samples], np.array([s.label for s in samples]), where


def process_start_ms(model: Path, image: Path, provider: str, runtime: str = "onnxruntime",
                     precision: str = "fp32", cache_dir: str | None = None,
                     provider_options: dict[str, str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
    """A fresh Python process: import, open the model, decode, predict one file."""
    code = ("import json, sys; from ctedge.edge.runtime import Classifier; "
            "c = Classifier(sys.argv[1], provider=sys.argv[3], runtime=sys.argv[4], precision=sys.argv[5], "
            "cache_dir=sys.argv[6] or None, provider_options=json.loads(sys.argv[7]), max_pixels=int(sys.argv[8])); "
            "c.predict_files([sys.argv[2]])")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(model), str(image), provider, runtime, precision,
                           cache_dir or "", json.dumps(provider_options or {}), str(max_pixels)],
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CtedgeError(f"{model}: the fresh-process cold-start run ({runtime} {precision}) failed "
                          f"(exit {done.returncode}): {last}")
    return (time.perf_counter() - started) * 1000


def _wanted_devices(name: str, options: BenchOptions) -> list[str]:
    """The devices to try for engine ``name``: --provider, or all of them (--all-providers, or
    --provider auto/a device of another engine with --runtime all)."""
    devices = list(engines.get_engine(name).devices)
    if options.all_providers or options.provider not in devices:
        return devices
    return [options.provider]


def variants_for(model: Path, options: BenchOptions) -> list[Variant]:
    """What to run a model with: one variant (every usable device with --all-providers), or
    with --runtime all every engine × precision × device this machine has (fp32 first)."""
    if options.runtime != "all":
        first = engines.resolve(model, engines.EngineConfig(runtime=options.runtime, precision=options.precision,
                                                            provider=options.provider))
        providers = [first.provider]
        if options.all_providers:
            spec = engines.get_engine(first.runtime)
            usable = {device for _, device in spec.variants(model, list(spec.devices))}
            providers = [device for device in spec.devices if device in usable]
        return [Variant(first.runtime, first.precision, provider) for provider in providers]
    found: list[Variant] = []
    for name in engines.engine_names():
        spec = engines.get_engine(name)
        if engines.installed(name) and model.suffix in spec.accepts:
            found += [Variant(name, precision, device)
                      for precision, device in spec.variants(model, _wanted_devices(name, options))]
    if not found:
        raise CtedgeError(engines.no_engine_message())
    return found


def score(labels: np.ndarray, probabilities: np.ndarray, threshold: float, resamples: int) -> dict:
    """AUC and accuracy with n and a 95% bootstrap CI."""
    from ctedge.core.metrics import bootstrap_ci, point_metrics

    point = point_metrics(labels, probabilities, threshold)
    ci = bootstrap_ci(labels, probabilities, threshold, resamples=resamples)
    return {"n": int(len(labels)), "positive": int(np.sum(labels)), "auc": point["auc"],
            "auc_ci": list(ci["auc"]), "accuracy": point["accuracy"], "accuracy_ci": list(ci["accuracy"])}


def open_variants(path: Path, options: BenchOptions, first_image: Path) -> tuple[list, list[dict]]:
    """Each variant's Classifier and the start of its row: engine, file, size, session
    build and warm-up apart from the first inference."""
    from ctedge.edge.runtime import Classifier

    opened, results = [], []
    for v in variants_for(path, options):
        clf = Classifier(path, v.provider, options.threads, runtime=v.runtime, precision=v.precision,
                         cache_dir=options.cache_dir, provider_options=options.provider_options, pad=options.pad,
                         max_pixels=options.max_pixels)
        one = clf.load(first_image)[None]
        started = time.perf_counter()
        clf.predict_arrays(one)
        first = time.perf_counter() - started
        opened.append(clf)
        info = clf.engine_info
        results.append({
            "model": str(path), "file": info.file, "runtime": v.runtime, "precision": v.precision,
            "provider": clf.providers[0], "provider_option": v.provider, "engine": info,
            "format": f"{v.runtime}-{v.precision}", "size_mb": _size_mb(Path(info.file)), "input_size": clf.size,
            "cold_start_ms": {"session": clf.startup_s["session"] * 1000,
                              "warmup": clf.startup_s.get("warmup", 0.0) * 1000, "first_inference": first * 1000}})
    return opened, results


def time_process_start(path: Path, options: BenchOptions, results: list[dict], image: Path) -> None:
    """Fresh-process cold start per variant; where the engine keeps what it builds (OpenVINO,
    onnxruntime on the CPU) also with an empty cache: a first start."""
    for r in results:
        cold, args = r["cold_start_ms"], (r["provider_option"], r["runtime"], r["precision"])
        if r["runtime"] == "openvino" or r["provider"] == "CPUExecutionProvider":
            with tempfile.TemporaryDirectory(prefix="ctedge-engine-cache-") as empty:
                cold["process_to_first_prediction_empty_cache"] = process_start_ms(
                    path, image, *args, empty, options.provider_options, options.max_pixels)
        cold["process_to_first_prediction"] = process_start_ms(path, image, *args, options.cache_dir,
                                                               options.provider_options, options.max_pixels)


def time_variants(opened: list, results: list[dict], options: BenchOptions, files: list[Path]) -> None:
    """Latency per batch size, one-image inference and end to end from a file, interleaved."""
    rng = np.random.default_rng(0)
    size = opened[0].size
    for r in results:
        r["latency"] = {}
    for batch in options.batch_sizes:
        x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        timed = time_interleaved([lambda c=c, x=x: c.predict_arrays(x) for c in opened], options.warmup,
                                 options.runs, options.seconds)
        for r, samples in zip(results, timed):
            r["latency"][str(batch)] = {**stats_ms(samples), "images_per_s": batch / np.mean(samples)}
    one = opened[0].load(files[0])[None]
    timed = time_interleaved([lambda c=c: c.predict_arrays(one) for c in opened], options.warmup,
                             options.runs, options.seconds)
    for r, samples in zip(results, timed):
        r["inference_ms"] = stats_ms(samples)
        r["samples_ms"] = (np.asarray(samples) * 1000).tolist()
    cycles = [itertools.cycle(files) for _ in opened]
    timed = time_interleaved([lambda c=c, it=it: c.predict_files([next(it)], 1) for c, it in zip(opened, cycles)],
                             options.warmup, options.runs, options.seconds)
    for r, samples in zip(results, timed):
        r["end_to_end_ms"] = stats_ms(samples)
        e2e = r["end_to_end_ms"]["p50"]
        r["budget"] = {"budget_ms": options.budget_ms, "end_to_end_p50_ms": e2e,
                       "margin_ms": options.budget_ms - e2e, "within": e2e <= options.budget_ms,
                       "preprocessing_share": 1 - r["inference_ms"]["p50"] / e2e}


def bench_model(path: Path, options: BenchOptions, files: list[Path],
                accuracy: tuple[list[Path], np.ndarray, str] | None) -> list[BenchRow]:
    """Every variant of one model, timed interleaved; accuracy against its fp32 run."""
    opened, results = open_variants(path, options, files[0])
    if options.process_start:
        time_process_start(path, options, results, files[0])
    time_variants(opened, results, options, files)
    compare_outputs(opened, results, options, files, accuracy)
    return [BenchRow.from_dict(r) for r in results]


def _size_mb(model_file: Path) -> float:
    size = model_file.stat().st_size
    if model_file.suffix == ".xml" and model_file.with_suffix(".bin").is_file():
        size += model_file.with_suffix(".bin").stat().st_size
    return size / 1e6


def compare_outputs(opened: list, results: list[dict], options: BenchOptions, files: list[Path],
                    accuracy: tuple[list[Path], np.ndarray, str] | None) -> None:
    """Each variant's probabilities on the same images against the first (fp32)
    variant's: max |Δp|, decision agreement, and with labels AUC/accuracy with CIs."""
    from ctedge.core.metrics import agreement, constant_message, output_spread

    if accuracy:
        paths, labels, _ = accuracy
    else:
        paths, labels = files, None
    inputs, keep = [], []
    for i, path in enumerate(paths):
        try:
            inputs.append(opened[0].load(path))
            keep.append(i)
        except CtedgeError:
            continue
    if not inputs:
        return
    images = np.stack(inputs)
    labels = labels[keep] if labels is not None else None
    outputs = [np.concatenate([c.predict_arrays(images[i:i + 16]) for i in range(0, len(images), 16)])
               for c in opened]
    reference, threshold = outputs[0], opened[0].threshold
    for r, p in zip(results, outputs):
        if options.data is not None:  # the user's images (not phantoms): is the model constant on them?
            spread = output_spread(p)  # nan for one image: no evidence either way
            r["output_spread"] = spread if np.isfinite(spread) else None
            r["constant_warning"] = constant_message(spread, len(p))
        change = {"reference": results[0]["format"], **agreement(reference, p, threshold)}
        if labels is not None and 0 < labels.sum() < len(labels):
            scores = score(labels, p, threshold, options.resamples)
            r["accuracy_detail"] = scores
            r["auc"], r["accuracy"] = scores["auc"], scores["accuracy"]
            change["auc_change"] = scores["auc"] - results[0]["accuracy_detail"]["auc"]
            change["accuracy_change"] = scores["accuracy"] - results[0]["accuracy_detail"]["accuracy"]
            change["within_tolerance"] = abs(change["auc_change"]) <= options.auc_tolerance
            change["tolerance"] = f"|AUC change| <= {options.auc_tolerance}"
        else:
            change["within_tolerance"] = change["max_abs_diff"] <= options.probability_tolerance
            change["tolerance"] = f"max |Δp| <= {options.probability_tolerance}"
        r["vs_fp32"] = change


def fastest(results: list[dict]) -> dict | None:
    """The variant with the lowest batch-1 (else smallest batch) p50 within tolerance."""
    def p50(r):
        latency = r["latency"]
        return latency["1"]["p50"] if "1" in latency else latency[min(latency, key=int)]["p50"]

    ok = [r for r in results if (r.get("vs_fp32") or {}).get("within_tolerance")]
    return min(ok, key=p50) if ok else None


def save_choice(model: Path, best: dict, reference: dict) -> Path | None:
    """MODEL.runtime.json beside the model: what runtime="auto" uses on this machine."""
    import json
    import logging

    from ctedge.edge.engines import choice_path, machine_key

    batch = "1" if "1" in best["latency"] else min(best["latency"], key=int)
    choice = {"runtime": best["runtime"], "precision": best["precision"], "provider": best["provider_option"],
              "machine": machine_key(), "measured": time.strftime("%Y-%m-%d %H:%M"),
              "batch": int(batch), "p50_ms": best["latency"][batch]["p50"],
              "ratio_to_fp32": best["latency"][batch]["p50"] / reference["latency"][batch]["p50"],
              "vs_fp32": best.get("vs_fp32")}
    path = choice_path(model)
    try:
        atomic_write(json.dumps(choice, indent=2).encode(), path)
    except OSError as exc:
        logging.getLogger(__name__).warning("could not write %s (%s); runtime auto stays onnxruntime", path, exc)
        return None
    return path


def bench_onnx(path: Path, provider: str, options: BenchOptions, files: list[Path],
               labels: np.ndarray | None) -> dict:
    """One model on one onnxruntime provider (kept for benchmarks/edge_speed.py)."""
    single = BenchOptions(**{**asdict(options), "runtime": "onnxruntime", "provider": provider,
                             "precision": None})  # the file as it is (a variant file at its own precision)
    accuracy = (files, labels, f"{len(files)} images") if labels is not None else None
    return bench_model(path, single, files, accuracy)[0].to_dict()


def find_models(models: list[Path], exports_dir: Path = Path("exports")) -> list[Path]:
    if models:
        missing = [m for m in models if not m.is_file()]
        if missing:
            raise CtedgeError(f"model not found: {missing[0]}")
        return models
    found = sorted(exports_dir.glob("*.onnx"))
    if not found:
        raise CtedgeError(f"no model given and no .onnx file in {exports_dir}/; "
                          "run `ctedge export --onnx` first")
    return found


def run_bench(models: list[Path], options: BenchOptions,
              baselines: dict[str, Callable[[Path, BenchOptions], dict]] | None = None) -> BenchReport:
    """Benchmark every model on every requested runtime, precision and provider; one report.

    ``baselines`` maps another model suffix to its timing function (the CLI passes
    ``ctedge.training.keras_bench.bench_keras`` for ``.keras``), so the edge never
    imports the training stack."""
    options.check()
    models = find_models(models)
    accuracy = accuracy_files(options)
    results, choices = [], {}
    with tempfile.TemporaryDirectory(prefix="ctedge-bench-") as tmp:
        files, _, source = bench_files(options.data, options.files, Path(tmp), options.max_pixels)
        for model in models:
            if model.suffix in (baselines or {}):
                results.append(BenchRow.from_dict(baselines[model.suffix](model, options)))
                continue
            if not any(model.suffix in engines.get_engine(n).accepts for n in engines.engine_names()):
                raise CtedgeError(f"{model}: bench takes .onnx and OpenVINO .xml models (.keras with ctedge[train])")
            rows = bench_model(model, options, files, accuracy)
            results += rows
            best = fastest([r.to_dict() for r in rows])
            if best is not None:
                choices[str(model)] = {"runtime": best["runtime"], "precision": best["precision"],
                                       "provider": best["provider"], "saved": None}
                if options.runtime == "all" and options.save_choice:
                    saved = save_choice(model, best, rows[0].to_dict())
                    choices[str(model)]["saved"] = str(saved) if saved else None
    return BenchReport(machine=machine_info(options.threads), options=asdict(options), data=source,
                       accuracy_data=accuracy[2] if accuracy else None, results=tuple(results), fastest=choices)
