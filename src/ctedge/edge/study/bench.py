"""The study benchmark's library part: one study timed end to end, split into stages.
The fresh-process measurement (command start to answer) lives in
``benchmarks/study_speed.py``, which calls this."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ctedge.core.errors import CtedgeError
from ctedge.edge.study.pipeline import STUDY_HINT, StudyOptions, call_size, predict_studies

STAGES = ("headers_selection", "decode_preprocess_cpu", "decode_wait", "inference", "aggregation")
TARGET_RATIO = 1.1  # bench --study: pipeline wall / inference alone, at most this


def bench_study(model: str | Path, folder: str | Path, options: StudyOptions | None = None,
                provider: str = "cpu", threads: int | None = None, runs: int = 3, *, runtime: str = "auto",
                precision: str | None = None, cache_dir: str | None = None,
                provider_options: dict[str, str] | None = None, pad: bool | None = None) -> dict:
    """Open ``model`` (timed as ``session_s``) and time one study ``runs`` times, split
    into stages.

    Stages overlap (decoding runs in threads during inference, calls run at once), so
    their busy times add up to more than the wall time; ``decode_wait`` is the time the
    pipeline's loop sat waiting for a decoded slice (calls may still have been running).
    The target ratio compares
    the pipeline's wall time with slices used x the per-slice time of inference alone,
    called as the pipeline calls it (1.0: reading fully hidden). The model runs under
    the throughput hint, as ``ctedge predict --study`` runs it.
    """
    from ctedge.edge.bench import machine_info, stats_ms, time_calls
    from ctedge.edge.runtime import Classifier

    options = options or StudyOptions()
    if runs < 1:
        raise CtedgeError(f"must be at least 1, not {runs}", param="study_runs")
    started = time.perf_counter()
    clf = Classifier(model, provider, threads, runtime=runtime, precision=precision, cache_dir=cache_dir,
                     provider_options=provider_options, pad=pad, max_pixels=options.max_pixels, hint=STUDY_HINT)
    session_s = time.perf_counter() - started
    size = call_size(clf.parallel, options.batch_size)
    slices = 2 * size * clf.parallel  # every call slot used twice
    x = np.random.default_rng(0).uniform(0, 255, (slices, clf.size, clf.size, 3)).astype(np.float32)
    calls = [x[start:start + size] for start in range(0, slices, size)]
    with ThreadPoolExecutor(clf.parallel) as pool:  # as the pipeline calls the model
        alone_ms = stats_ms(time_calls(lambda: list(pool.map(clf.predict_arrays, calls)), 1, 5, None))
    per_slice_s = alone_ms["p50"] / 1000 / slices
    rows = [_timed_run(clf, folder, options, per_slice_s) for _ in range(runs)]
    median = {key: float(np.median([row[key] for row in rows])) for key in rows[0] if key != "probability"}
    return {"machine": machine_info(threads), "model": str(model), "provider": clf.providers[0],
            "runtime": clf.runtime, "precision": clf.precision, "provider_options": dict(provider_options or {}),
            "fixed_batch": clf.fixed_batch, "input_size": clf.size, "study": str(folder),
            "options": options.to_dict(), "session_s": session_s, "inference_alone_ms": alone_ms,
            "inference_alone_slices": slices,
            "per_slice_inference_s": per_slice_s, "runs": rows, "median": median}


def _timed_run(clf, folder: str | Path, options: StudyOptions, per_slice_s: float) -> dict:
    started = time.perf_counter()
    results = predict_studies(clf, [folder], options)
    wall = time.perf_counter() - started
    ok = [r for r in results if not r.error]
    if not ok:
        raise CtedgeError(f"{folder}: no study could be classified ({results[0].error})")
    r = ok[0]
    row = {stage: r.timings_s.get(stage, 0.0) for stage in STAGES}
    row.update(wall_s=wall, pipeline_wall_s=r.timings_s["pipeline_wall"], slices_total=r.slices_total,
               slices_sampled=r.slices_sampled, slices_used=r.slices_used, slice_step=r.slice_step,
               slices_per_s=r.slices_used / wall, probability=r.probability,
               target_ratio=r.timings_s["pipeline_wall"] / (r.slices_used * per_slice_s))
    return row
