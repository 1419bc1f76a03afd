"""`ctedge bench`: latency, throughput, cold start, end-to-end and accuracy per model.

TensorFlow-free for ONNX models; a ``.keras`` model adds a TF ``tf.function``
baseline in the same run (TensorFlow imported only then).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CtedgeError

DEFAULT_BUDGET_MS = 2000.0  # the seed paper's "within a few seconds", end to end


@dataclass
class BenchOptions:
    provider: str = "cpu"  # cpu | cuda | tensorrt | all
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 16])
    threads: int | None = None
    warmup: int = 3
    runs: int = 20
    seconds: float | None = None
    data: str | None = None
    files: int = 16  # images for the end-to-end and accuracy measures (max)
    budget_ms: float = DEFAULT_BUDGET_MS
    process_start: bool = True


def machine_info(threads: int | None) -> dict:
    """CPU, cores, onnxruntime version and providers: part of every report."""
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(), "threads": threads or "default"}


def stats_ms(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1000
    return {"min": float(ms.min()), "mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99)),
            "max": float(ms.max()), "runs": int(len(ms))}


def time_calls(call, warmup: int, runs: int, seconds: float | None) -> list[float]:
    """Wall time of ``call()`` after warm-up, for ``runs`` calls or ``seconds``."""
    for _ in range(warmup):
        call()
    samples: list[float] = []
    deadline = time.perf_counter() + seconds if seconds else None
    while (len(samples) < runs) if deadline is None else (time.perf_counter() < deadline or not samples):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def _readable(path: Path) -> bool:
    from .imageio import read_image

    try:
        read_image(path)
        return True
    except CtedgeError:
        return False


def bench_files(data: str | None, count: int) -> tuple[list[Path], np.ndarray | None, str]:
    """Image files for end-to-end timing and accuracy: a labelled data folder, a
    flat folder, or generated phantom PNGs."""
    import cv2

    from .data import pick_samples
    from .phantoms import phantom

    if data:
        chosen, labelled = pick_samples(data, count)
        readable = [s for s in chosen if _readable(s.path)]
        if not readable:
            raise CtedgeError(f"none of the {len(chosen)} images picked from {data} can be read")
        labels = np.array([s.label for s in readable]) if labelled else None
        skipped = f", {len(chosen) - len(readable)} unreadable skipped" if len(readable) < len(chosen) else ""
        return [s.path for s in readable], labels, f"{len(readable)} images from {data}{skipped}"
    folder = Path(tempfile.mkdtemp(prefix="ctedge-bench-"))
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        files.append(folder / f"phantom_{i}.png")
        cv2.imwrite(str(files[-1]), phantom(rng, 512, bool(i % 2)))
    # phantom labels mean nothing to a model trained on real scans: no accuracy
    return files, None, f"{count} generated 512 px phantoms (timing only)"


def process_start_ms(model: Path, image: Path, provider: str) -> float:
    """A fresh Python process: import, open the model, decode, predict one file."""
    code = ("import sys; from ctedge.runtime import Classifier; "
            "c = Classifier(sys.argv[1], provider=sys.argv[3]); c.predict_files([sys.argv[2]])")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model), str(image), provider], check=True,
                   capture_output=True)
    return (time.perf_counter() - started) * 1000


def bench_onnx(path: Path, provider: str, options: BenchOptions, files: list[Path],
               labels: np.ndarray | None) -> dict:
    """Timings on random arrays and ``files``; output spread (and, labelled,
    accuracy/AUC) when the files are the user's (``options.data``), not phantoms."""
    from .metrics import constant_message, output_spread, point_metrics
    from .runtime import Classifier

    started = time.perf_counter()
    clf = Classifier(path, provider, options.threads)
    created = time.perf_counter() - started
    one = clf.load(files[0])[None]
    started = time.perf_counter()
    clf.predict_arrays(one)
    first = time.perf_counter() - started
    result = {"model": str(path), "format": f"onnx-{clf.metadata.get('variant', 'fp32')}",
              "provider": clf.providers[0], "size_mb": path.stat().st_size / 1e6,
              "input_size": clf.size,
              "cold_start_ms": {"session": created * 1000, "first_inference": first * 1000}}
    if options.process_start:
        result["cold_start_ms"]["process_to_first_prediction"] = process_start_ms(path, files[0], provider)
    rng = np.random.default_rng(0)
    result["latency"] = {}
    for batch in options.batch_sizes:
        x = rng.uniform(0, 255, (batch, clf.size, clf.size, 3)).astype(np.float32)
        samples = time_calls(lambda: clf.predict_arrays(x), options.warmup, options.runs, options.seconds)
        entry = stats_ms(samples)
        entry["images_per_s"] = batch / np.mean(samples)
        result["latency"][str(batch)] = entry
    samples = time_calls(lambda: clf.predict_arrays(one), options.warmup, options.runs, options.seconds)
    result["inference_ms"] = stats_ms(samples)
    result["samples_ms"] = (np.asarray(samples) * 1000).tolist()
    cycle = iter(files * (options.runs + options.warmup + 1000))
    given = options.data is not None
    result["end_to_end_ms"] = stats_ms(time_calls(lambda: clf.predict_files([next(cycle)], 1),
                                                  options.warmup, options.runs, options.seconds))
    if given:  # the user's images: is the model constant on them? and, labelled, how good?
        probabilities = np.array([row.probability for row in clf.predict_files(files)])
        result["output_spread"] = output_spread(probabilities)
        result["constant_warning"] = constant_message(result["output_spread"], len(files))
        if labels is not None:
            scores = point_metrics(labels, probabilities, clf.threshold)
            result["accuracy"], result["auc"] = scores["accuracy"], scores["auc"]
    e2e = result["end_to_end_ms"]["p50"]
    result["budget"] = {"budget_ms": options.budget_ms, "end_to_end_p50_ms": e2e,
                        "margin_ms": options.budget_ms - e2e, "within": e2e <= options.budget_ms,
                        "preprocessing_share": 1 - result["inference_ms"]["p50"] / e2e}
    return result


def bench_keras(path: Path, options: BenchOptions) -> dict:
    """TensorFlow baseline: ``tf.function`` (not ``model.predict``) per batch."""
    import tensorflow as tf

    from .model import load_model

    model = load_model(path)
    size = int(model.input_shape[1])
    infer = tf.function(lambda x: model(x, training=False))
    rng = np.random.default_rng(0)
    result = {"model": str(path), "format": "keras-tf.function", "provider": "tensorflow-cpu",
              "size_mb": path.stat().st_size / 1e6, "input_size": size, "latency": {}}
    for batch in options.batch_sizes:
        x = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
        samples = time_calls(lambda: infer(x).numpy(), options.warmup, options.runs, options.seconds)
        entry = stats_ms(samples)
        entry["images_per_s"] = batch / np.mean(samples)
        result["latency"][str(batch)] = entry
        result.setdefault("samples_ms", (np.asarray(samples) * 1000).tolist())
    return result


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


def run_bench(models: list[Path], options: BenchOptions) -> dict:
    """Benchmark every model on every requested provider; one report."""
    import onnxruntime as ort

    from .runtime import PROVIDERS

    models = find_models(models)
    available = ort.get_available_providers()
    providers = ([name for name, ep in PROVIDERS.items() if ep in available]
                 if options.provider == "all" else [options.provider])
    files, labels, source = bench_files(options.data, options.files)
    results = []
    for model in models:
        if model.suffix == ".keras":
            results.append(bench_keras(model, options))
            continue
        if model.suffix != ".onnx":
            raise CtedgeError(f"{model}: bench takes .onnx or .keras models")
        for provider in providers:
            results.append(bench_onnx(model, provider, options, files, labels))
    return {"machine": machine_info(options.threads), "options": asdict(options),
            "data": source, "results": results}


def table_rows(report: dict) -> list[dict]:
    """One row per model, provider and batch size, as both tables show them."""
    rows = []
    for r in report["results"]:
        e2e = r.get("end_to_end_ms", {}).get("p50")
        cold = r.get("cold_start_ms", {}).get("process_to_first_prediction")
        for batch, lat in r["latency"].items():
            rows.append({"model": Path(r["model"]).name, "format": r["format"], "provider": r["provider"],
                         "MB": f"{r['size_mb']:.1f}", "batch": batch, "p50 ms": f"{lat['p50']:.1f}",
                         "p90 ms": f"{lat['p90']:.1f}", "p99 ms": f"{lat['p99']:.1f}",
                         "images/s": f"{lat['images_per_s']:.1f}",
                         "end-to-end p50 ms": "" if e2e is None else f"{e2e:.1f}",
                         "cold start ms": "" if cold is None else f"{cold:.0f}",
                         "AUC": "" if r.get("auc") is None else f"{r['auc']:.3f}"})
    return rows


def markdown(report: dict) -> str:
    """The report as a markdown table with the machine described."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}, "
             f"onnxruntime {m['onnxruntime']} ({', '.join(m['available_providers'])}), "
             f"threads {m['threads']}. Data: {report['data']}.", ""]
    rows = table_rows(report)
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
    return "\n".join(lines) + "\n"
