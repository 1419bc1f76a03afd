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

from ctedge.core.choices import BenchRuntime
from ctedge.core.errors import CtedgeError
from ctedge.core.files import atomic_write
from ctedge.core.metrics import DEFAULT_RESAMPLES

DEFAULT_BUDGET_MS = 2000.0  # the seed paper's "within a few seconds", end to end
BENCH_RUNTIMES = BenchRuntime.values()


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
    cache_dir: str | None = None  # OpenVINO compiled-model cache
    save_choice: bool = True  # --runtime all: write MODEL.runtime.json for runtime="auto"
    all_providers: bool = False  # every onnxruntime provider this machine has, instead of ``provider``

    def check(self) -> None:
        if self.runtime not in BENCH_RUNTIMES:
            raise CtedgeError(f"must be {', '.join(BENCH_RUNTIMES)}, not {self.runtime!r}", param="runtime")
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
    """CPU, cores, ISA features, engine versions and providers: part of every report."""
    from ctedge.edge.engines import cpu_name, installed, isa_features

    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "isa": isa_features(), "threads": threads or "default",
            "onnxruntime": None, "available_providers": [], "openvino": None}
    if installed("onnxruntime"):
        import onnxruntime as ort

        info["onnxruntime"], info["available_providers"] = ort.__version__, ort.get_available_providers()
    if installed("openvino"):
        import openvino as ov

        info["openvino"] = ov.__version__.split("-")[0]
        info["openvino_cpu_capabilities"] = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return info


def isa_line(machine: dict) -> str:
    isa = machine.get("isa", {})
    return "ISA: " + ", ".join(f"{name} {'yes' if has else 'no'}" for name, has in isa.items())


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


def _readable(path: Path) -> bool:
    from ctedge.core.imageio import read_image

    try:
        read_image(path)
        return True
    except CtedgeError:
        return False


def bench_files(data: str | None, count: int, folder: Path | None = None
                ) -> tuple[list[Path], np.ndarray | None, str]:
    """Image files for end-to-end timing and accuracy: a labelled data folder, a
    flat folder, or generated phantom PNGs written to ``folder`` (the caller's
    temporary folder, which it removes)."""
    import cv2

    from ctedge.core.data import pick_samples
    from ctedge.core.phantoms import phantom

    if data:
        chosen, labelled = pick_samples(data, count)
        readable = [s for s in chosen if _readable(s.path)]
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
                     precision: str = "fp32", cache_dir: str | None = None) -> float:
    """A fresh Python process: import, open the model, decode, predict one file."""
    code = ("import sys; from ctedge.edge.runtime import Classifier; "
            "c = Classifier(sys.argv[1], provider=sys.argv[3], runtime=sys.argv[4], precision=sys.argv[5], "
            "cache_dir=sys.argv[6] or None); c.predict_files([sys.argv[2]])")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(model), str(image), provider, runtime, precision,
                           cache_dir or ""], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise CtedgeError(f"{model}: the fresh-process cold-start run ({runtime} {precision}) failed "
                          f"(exit {done.returncode}): {last}")
    return (time.perf_counter() - started) * 1000


def variants_for(model: Path, options: BenchOptions) -> list[Variant]:
    """What to run a model with: one variant, or with --runtime all every runtime ×
    precision × provider this machine has (the model's fp32 run first)."""
    from ctedge.edge.engines import EngineConfig, installed, resolve

    if options.runtime != "all":
        providers = [options.provider]
        if options.all_providers:
            from ctedge.edge.engines import PROVIDERS, usable_providers

            available = usable_providers()
            providers = [name for name, ep in PROVIDERS.items() if ep in available]
        chosen = []
        for provider in providers:
            config = resolve(model, EngineConfig(runtime=options.runtime, precision=options.precision,
                                                 provider=provider))
            chosen.append(Variant(config.runtime, config.precision,
                                  provider if config.runtime == "onnxruntime" else config.provider))
        return chosen
    found: list[Variant] = []
    if installed("onnxruntime") and model.suffix == ".onnx":
        from ctedge.edge.engines import PROVIDERS, usable_providers

        available = usable_providers()
        wanted = [options.provider] if options.provider in PROVIDERS and not options.all_providers else list(PROVIDERS)
        for provider in [p for p in wanted if PROVIDERS[p] in available]:
            found.append(Variant("onnxruntime", "fp32", provider))
            for precision, suffix in (("fp16", "_fp16"), ("int8", "_int8")):
                if model.with_name(model.stem + suffix + ".onnx").is_file():
                    found.append(Variant("onnxruntime", precision, provider))
    if installed("openvino"):
        from ctedge.edge.engines import OV_CAPABILITY, ov_capabilities

        capabilities = ov_capabilities("CPU")
        found.append(Variant("openvino", "fp32", "cpu"))
        for precision in ("bf16", "fp16"):
            if OV_CAPABILITY[precision] in capabilities:
                found.append(Variant("openvino", precision, "cpu"))
        ir = model if model.suffix == ".xml" else model.with_name(model.stem + "_ov.xml")
        if ir.with_name(ir.stem + "_int8.xml").is_file():
            found.append(Variant("openvino", "int8", "cpu"))
    if not found:
        from ctedge.edge.engines import no_engine_message

        raise CtedgeError(no_engine_message())
    return found


def score(labels: np.ndarray, probabilities: np.ndarray, threshold: float, resamples: int) -> dict:
    """AUC and accuracy with n and a 95% bootstrap CI."""
    from ctedge.core.metrics import bootstrap_ci, point_metrics

    point = point_metrics(labels, probabilities, threshold)
    ci = bootstrap_ci(labels, probabilities, threshold, resamples=resamples)
    return {"n": int(len(labels)), "positive": int(np.sum(labels)), "auc": point["auc"],
            "auc_ci": list(ci["auc"]), "accuracy": point["accuracy"], "accuracy_ci": list(ci["accuracy"])}


def bench_model(path: Path, options: BenchOptions, files: list[Path],
                accuracy: tuple[list[Path], np.ndarray, str] | None) -> list[dict]:
    """Every variant of one model, timed interleaved; accuracy against its fp32 run."""
    from ctedge.edge.runtime import Classifier

    variants = variants_for(path, options)
    opened, results = [], []
    for v in variants:
        started = time.perf_counter()
        clf = Classifier(path, v.provider, options.threads, runtime=v.runtime, precision=v.precision,
                         cache_dir=options.cache_dir)
        created = time.perf_counter() - started
        one = clf.load(files[0])[None]
        started = time.perf_counter()
        clf.predict_arrays(one)
        first = time.perf_counter() - started
        opened.append(clf)
        model_file = Path(getattr(clf.engine, "path", path))
        results.append({
            "model": str(path), "file": str(model_file), "runtime": v.runtime, "precision": v.precision,
            "provider": clf.providers[0], "provider_option": v.provider,
            "format": f"{v.runtime}-{v.precision}", "size_mb": _size_mb(model_file), "input_size": clf.size,
            "cold_start_ms": {"session": created * 1000, "first_inference": first * 1000}})
    if options.process_start:
        for v, r in zip(variants, results):
            cold = r["cold_start_ms"]
            if v.runtime == "openvino":
                with tempfile.TemporaryDirectory(prefix="ctedge-ov-cache-") as empty:
                    cold["process_to_first_prediction_empty_cache"] = process_start_ms(
                        path, files[0], v.provider, v.runtime, v.precision, empty)
            cold["process_to_first_prediction"] = process_start_ms(
                path, files[0], v.provider, v.runtime, v.precision, options.cache_dir)
    rng = np.random.default_rng(0)
    size = opened[0].size
    for r in results:
        r["latency"] = {}
    for batch in options.batch_sizes:
        x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        timed = time_interleaved([lambda c=c, x=x: c.predict_arrays(x) for c in opened], options.warmup,
                                 options.runs, options.seconds)
        for r, samples in zip(results, timed):
            entry = stats_ms(samples)
            entry["images_per_s"] = batch / np.mean(samples)
            r["latency"][str(batch)] = entry
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
    compare_outputs(opened, results, options, files, accuracy)
    return results


def _size_mb(model_file: Path) -> float:
    size = model_file.stat().st_size
    if model_file.suffix == ".xml" and model_file.with_suffix(".bin").is_file():
        size += model_file.with_suffix(".bin").stat().st_size
    return size / 1e6


def compare_outputs(opened: list, results: list[dict], options: BenchOptions, files: list[Path],
                    accuracy: tuple[list[Path], np.ndarray, str] | None) -> None:
    """Each variant's probabilities on the same images against the first (fp32)
    variant's: max |Δp|, decision agreement, and with labels AUC/accuracy with CIs."""
    from ctedge.core.metrics import constant_message, output_spread

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
            r["output_spread"] = output_spread(p)
            r["constant_warning"] = constant_message(r["output_spread"], len(p))
        change = {"reference": results[0]["format"], "images": int(len(p)),
                  "max_abs_diff": float(np.max(np.abs(p - reference))),
                  "decision_agreement": float(np.mean((p >= threshold) == (reference >= threshold)))}
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

    ok = [r for r in results if r.get("vs_fp32", {}).get("within_tolerance")]
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
                             "precision": "fp32"})
    accuracy = (files, labels, f"{len(files)} images") if labels is not None else None
    return bench_model(path, single, files, accuracy)[0]


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
              baselines: dict[str, Callable[[Path, BenchOptions], dict]] | None = None) -> dict:
    """Benchmark every model on every requested runtime, precision and provider; one report.

    ``baselines`` maps another model suffix to its timing function (the CLI passes
    ``ctedge.training.keras_bench.bench_keras`` for ``.keras``), so the edge never
    imports the training stack."""
    options.check()
    models = find_models(models)
    accuracy = accuracy_files(options)
    results, choices = [], {}
    with tempfile.TemporaryDirectory(prefix="ctedge-bench-") as tmp:
        files, _, source = bench_files(options.data, options.files, Path(tmp))
        for model in models:
            if model.suffix in (baselines or {}):
                results.append(baselines[model.suffix](model, options))
                continue
            if model.suffix not in (".onnx", ".xml"):
                raise CtedgeError(f"{model}: bench takes .onnx and OpenVINO .xml models (.keras with ctedge[train])")
            rows = bench_model(model, options, files, accuracy)
            results += rows
            best = fastest(rows)
            if best is not None:
                choices[str(model)] = {"runtime": best["runtime"], "precision": best["precision"],
                                       "provider": best["provider"], "saved": None}
                if options.runtime == "all" and options.save_choice:
                    saved = save_choice(model, best, rows[0])
                    choices[str(model)]["saved"] = str(saved) if saved else None
    return {"machine": machine_info(options.threads), "options": asdict(options),
            "data": source, "accuracy_data": accuracy[2] if accuracy else None,
            "results": results, "fastest": choices}


def table_rows(report: dict) -> list[dict]:
    """One row per model, variant and batch size, as both tables show them."""
    rows = []
    for r in report["results"]:
        e2e = r.get("end_to_end_ms", {}).get("p50")
        cold = r.get("cold_start_ms", {}).get("process_to_first_prediction")
        change = r.get("vs_fp32", {})
        detail = r.get("accuracy_detail")
        base = next((x for x in report["results"] if x["model"] == r["model"]), r)
        for batch, lat in r["latency"].items():
            ref = base["latency"].get(batch, {}).get("p50")
            rows.append({"model": Path(r["model"]).name, "format": r["format"], "provider": r["provider"],
                         "MB": f"{r['size_mb']:.1f}", "batch": batch, "p50 ms": f"{lat['p50']:.1f}",
                         "p90 ms": f"{lat['p90']:.1f}", "p99 ms": f"{lat['p99']:.1f}",
                         "/ fp32": "" if not ref else f"{lat['p50'] / ref:.2f}",
                         "images/s": f"{lat['images_per_s']:.1f}",
                         "end-to-end p50 ms": "" if e2e is None else f"{e2e:.1f}",
                         "cold start ms": "" if cold is None else f"{cold:.0f}",
                         "AUC": "" if detail is None else
                         f"{detail['auc']:.3f} ({detail['auc_ci'][0]:.3f}-{detail['auc_ci'][1]:.3f}) n={detail['n']}",
                         "AUC Δ": "" if "auc_change" not in change else f"{change['auc_change']:+.4f}",
                         "max |Δp|": "" if not change else f"{change['max_abs_diff']:.1e}"})
    return rows


def budget_line(result: dict) -> tuple[bool, str]:
    """(within the budget, the sentence) for one result with a ``budget``."""
    b = result["budget"]
    share = (f"{b['preprocessing_share']:.0%} of it" if b["preprocessing_share"] > 0
             else "within the timing noise")
    return b["within"], (f"{Path(result['model']).name} ({result['format']}, {result['provider']}): end-to-end p50 "
                         f"{b['end_to_end_p50_ms']:.1f} ms, {'within' if b['within'] else 'OVER'} the "
                         f"{b['budget_ms']:.0f} ms budget (margin {b['margin_ms']:.0f} ms); decode+resize is {share}")


def closing_lines(report: dict) -> list[str]:
    """Per model: the fastest variant within the accuracy tolerance."""
    lines = []
    for model, choice in report.get("fastest", {}).items():
        rows = [r for r in report["results"] if r["model"] == model]
        best = next(r for r in rows if r["runtime"] == choice["runtime"] and r["precision"] == choice["precision"]
                    and r["provider"] == choice["provider"])
        batch = "1" if "1" in best["latency"] else min(best["latency"], key=int)
        ratio = best["latency"][batch]["p50"] / rows[0]["latency"][batch]["p50"]
        line = (f"fastest within tolerance for {Path(model).name}: {best['runtime']} {best['precision']} on "
                f"{best['provider']}, batch-{batch} p50 {best['latency'][batch]['p50']:.1f} ms "
                f"({ratio:.2f}x {rows[0]['format']}; {best['vs_fp32']['tolerance']})")
        if choice.get("saved"):
            line += f"; saved to {choice['saved']} for --runtime auto"
        lines.append(line)
    return lines


def markdown(report: dict) -> str:
    """The report as a markdown table with the machine described."""
    m = report["machine"]
    engines = ", ".join(filter(None, [
        m.get("onnxruntime") and f"onnxruntime {m['onnxruntime']} ({', '.join(m['available_providers'])})",
        m.get("openvino") and f"OpenVINO {m['openvino']}"]))
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
             f"{engines}, threads {m['threads']}. {isa_line(m)}. Timing data: {report['data']}."
             + (f" Accuracy: {report['accuracy_data']}." if report.get("accuracy_data") else ""), ""]
    rows = table_rows(report)
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    lines += [""] + closing_lines(report)
    return "\n".join(lines) + "\n"
