"""Stage 4, pipeline: decode the sampled slices in worker threads, overlapped with
inference (single slices, calls at once, under the throughput hint; else batches); then
aggregate into one ``StudyResult`` per study.

A study where no series meets the rules (``StudyOptions.rules``) is not eligible:
no answer, and not an error. A study gets an error, not an answer, when its chosen series has fewer than
``MIN_POSITIONS`` distinct slice positions or more than half of its sampled
slices fail to decode: a patient's answer from a handful of slices is garbage.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ctedge.core.dicom import DEFAULT_MAX_PIXELS
from ctedge.core.errors import CtedgeError
from ctedge.core.metrics import constant_message, output_spread
from ctedge.core.preprocess import PREPROCESS_CONTRACT
from ctedge.core.results import SliceScore, StudiesReport, StudyResult
from ctedge.edge.engines.machine import usable_cpus
from ctedge.edge.study.aggregate import AGGREGATES, DEFAULT_TOP_K, aggregate, aggregate_label
from ctedge.edge.study.hu import LUNG_HU, LUNG_MIN_FRACTION, decode_slice
from ctedge.edge.study.read import DEFAULT_MAX_BYTES, find_studies
from ctedge.edge.study.records import SliceRef, Study
from ctedge.edge.study.rules import DEFAULT_RULES, SeriesRules
from ctedge.edge.study.select import order_slices, sample_indices, select_series

DEFAULT_MAX_SLICES = 64
MIN_POSITIONS = 8  # distinct slice positions a patient's answer needs
MAX_FAILED_SHARE = 0.5  # of the sampled slices; more failing: no answer
THUMBNAIL = 96
STUDY_HINT = "throughput"  # how every study path builds its Classifier: single slices, calls at once


def call_size(parallel: int, batch_size: int) -> int:
    """Slices per inference call: one when the engine serves calls at once, else a batch."""
    return batch_size if parallel == 1 else 1


@dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """How a study is classified; checked when made (a bad value never reaches the pipeline)."""

    series_uid: str | None = None
    slice_step: int | None = None  # None: as many as keep at most max_slices
    max_slices: int = DEFAULT_MAX_SLICES
    aggregate: str = "topk"
    top_k: int = DEFAULT_TOP_K
    batch_size: int = 8  # slices per call on an engine serving one call at a time; else 1
    workers: int | None = None  # decode threads (default: the CPU count)
    keep_thumbnails: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS  # per slice, from its header
    max_bytes: int = DEFAULT_MAX_BYTES  # per zip entry or NIfTI volume, uncompressed
    threshold: float | None = None  # None: the model's metadata threshold
    rules: SeriesRules = DEFAULT_RULES  # which series may be scored

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if str(self.aggregate) not in AGGREGATES:
            raise CtedgeError(f"must be one of {', '.join(AGGREGATES)}, not {self.aggregate!r}", param="aggregate")
        for name in ("top_k", "max_slices", "batch_size", "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise CtedgeError(f"must be between 0 and 1, not {self.threshold}", param="threshold")
        if not isinstance(self.rules, SeriesRules):
            raise CtedgeError(f"must be SeriesRules, not {type(self.rules).__name__}", param="rules")
        for name in ("slice_step", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise CtedgeError(f"must be at least 1, not {getattr(self, name)}", param=name)

    def to_dict(self) -> dict[str, Any]:
        """The options a result reports (thumbnails are a display matter)."""
        data = asdict(self)
        data.pop("keep_thumbnails")
        data["aggregate"] = str(self.aggregate)
        data["rules"] = self.rules.to_dict()
        return data


def _study_fields(study: Study) -> dict[str, Any]:
    first = next((refs[0] for refs in study.series.values() if refs), None)
    attributes = dict(first.attributes) if first else {}
    return {"input": study.input, "study_uid": study.study_uid, "patient_id": study.patient_id,
            "accession_number": attributes.get("AccessionNumber", ""), "study_date": attributes.get("StudyDate", ""),
            "attributes": attributes, "warnings": list(study.warnings), "error": study.error, "timings_s": {}}


def _finish(draft: dict[str, Any]) -> StudyResult:
    draft["warnings"] = tuple(draft["warnings"])
    return StudyResult(**draft)


def _no_series_error(options: StudyOptions, rejected) -> str:
    asked = f"series {options.series_uid} " if options.series_uid else "no axial CT series "
    reasons = "; ".join(f"{r.series_uid}: {r.reason}" for r in rejected
                        if options.series_uid is None or r.series_uid == options.series_uid)
    return asked + ("is not usable" if options.series_uid else "found") + (f" ({reasons})" if reasons else
                                                                         " (not in this study)")


def classify_study(clf, study: Study, options: StudyOptions | None = None) -> StudyResult:
    """One study -> one result; the study's problems become ``warnings`` or ``error`` (never
    raised); the model failing (its engine raising) is raised, so a caller may retry (serve does).

    ``clf`` is anything with ``predict_arrays``, ``label``, ``size``, ``window`` and
    ``threshold`` (``ctedge.edge.runtime.Classifier`` or another backend; ``parallel``
    if it serves several calls at once); with ``options.threshold`` also ``positive``
    and ``negative`` (the model is not changed).
    """
    options = options or StudyOptions()
    started = time.perf_counter()
    draft = _study_fields(study)
    draft["threshold"] = float(clf.threshold if options.threshold is None else options.threshold)
    if study.error:
        return _finish(draft)
    selection = select_series(study, options.series_uid, options.rules)
    chosen, draft["series_rejected"] = selection.series_uid, tuple(selection.rejected)
    if selection.not_eligible:
        draft["not_eligible"] = selection.not_eligible
        return _finish(draft)
    if chosen is None:
        draft["error"] = _no_series_error(options, selection.rejected)
        return _finish(draft)
    refs = study.series[chosen]
    ordered, positions, warnings = order_slices(refs)
    indices, step = sample_indices(len(ordered), options.slice_step, options.max_slices)
    draft.update(series_uid=chosen, series_description=refs[0].description, slices_total=len(ordered),
                 positions=len(ordered), slice_step=step, slices_sampled=len(indices))
    draft["warnings"] += warnings
    draft["timings_s"]["headers_selection"] = time.perf_counter() - started
    if len(ordered) < MIN_POSITIONS:
        draft["error"] = (f"only {len(ordered)} distinct slice position(s) in series {chosen}; a patient's "
                          f"answer needs at least {MIN_POSITIONS}")
        return _finish(draft)
    probabilities, used, thumbnails = _run_pipeline(clf, ordered, indices, options, draft)
    if draft["error"]:
        return _finish(draft)
    started = time.perf_counter()
    if not used:
        draft["error"] = (f"no slice with lung among the {len(indices)} sampled (criterion: at least "
                          f"{LUNG_MIN_FRACTION:.0%} of the body outline in {LUNG_HU[0]:.0f}..{LUNG_HU[1]:.0f} HU)")
    else:
        _aggregate_into(draft, clf, options, probabilities, used, ordered, positions)
    draft["thumbnails"] = thumbnails
    draft["timings_s"]["aggregation"] = time.perf_counter() - started
    return _finish(draft)


def _aggregate_into(draft: dict, clf, options: StudyOptions, probabilities: list[float], used: list[int],
                    ordered: list[SliceRef], positions: np.ndarray) -> None:
    p = np.asarray(probabilities)
    probability = aggregate(p, str(options.aggregate), options.top_k)
    slices = tuple(SliceScore(index=i, position_mm=round(float(positions[i]), 3), probability=float(q),
                              sop_instance_uid=ordered[i].sop_uid, source=ordered[i].name)
                   for i, q in zip(used, p))
    top = np.argsort(-p, kind="stable")[:options.top_k]
    threshold = draft["threshold"]
    label = clf.label(probability) if options.threshold is None else \
        (clf.positive if probability >= threshold else clf.negative)
    draft.update(slices_used=len(used), probability=probability, label=label, slices=slices,
                 aggregate=aggregate_label(str(options.aggregate), options.top_k, len(p)),
                 top_slices=tuple(slices[j] for j in top))


def _report_failures(draft: dict, failed: list[str], sampled: int) -> None:
    draft["slices_failed"] = len(failed)
    draft["warnings"] += [f"{msg}; slice skipped" for msg in failed[:5]]
    if len(failed) > 5:
        draft["warnings"].append(f"... and {len(failed) - 5} more slice(s) that could not be decoded")
    if failed and len(failed) > MAX_FAILED_SHARE * sampled:
        draft["error"] = (f"{len(failed)} of the {sampled} sampled slices could not be decoded (more than "
                          f"{MAX_FAILED_SHARE:.0%}; first: {failed[0]})")


def _run_pipeline(clf, ordered: list[SliceRef], indices: list[int], options: StudyOptions,
                  draft: dict) -> tuple[list[float], list[int], dict[int, np.ndarray]]:
    """Decode in worker threads while the model runs: batches of ``options.batch_size``, or
    on an engine serving ``clf.parallel`` > 1 calls at once (the throughput hint) single
    slices, that many at a time (a 300-slice study, B3 on 2 cores: pipeline 1.1-1.2 s
    instead of 1.4, the same probabilities)."""
    workers = options.workers or usable_cpus()
    prefetch = max(2 * options.batch_size, 2 * workers)
    parallel = getattr(clf, "parallel", 1)
    batch_size = call_size(parallel, options.batch_size)
    thumbnail = THUMBNAIL if options.keep_thumbnails else 0
    contract = getattr(clf, "contract", PREPROCESS_CONTRACT)
    probabilities: list[float] = []
    used: list[int] = []
    thumbnails: dict[int, np.ndarray] = {}
    batch: list = []
    running: deque = deque()  # (batch, future of its outputs), oldest first
    timing = {"decode_preprocess_cpu": 0.0, "decode_wait": 0.0}
    calls: list[float] = []  # each inference call's seconds (calls overlap when parallel)
    failed: list[str] = []
    non_lung = 0

    def run(images: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = np.asarray(clf.predict_arrays(images), float).reshape(-1)
        calls.append(time.perf_counter() - started)
        return out

    def collect() -> None:
        done, future = running.popleft()
        for (i, d), q in zip(done, future.result()):
            if not np.isfinite(q):
                failed.append(f"{ordered[i].name}: the model's output is {q}")
                continue
            probabilities.append(float(q))
            used.append(i)
            if d.thumbnail is not None:
                thumbnails[i] = d.thumbnail

    def submit() -> None:
        if len(running) == parallel:
            collect()
        running.append((list(batch), inference.submit(run, np.stack([d.image for _, d in batch]))))
        batch.clear()

    started = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="ctedge-decode") as pool, \
            ThreadPoolExecutor(parallel, thread_name_prefix="ctedge-infer") as inference:
        pending: deque = deque(
            (i, pool.submit(decode_slice, ordered[i], clf.window, clf.size, thumbnail, contract, options.max_pixels))
            for i in indices[:prefetch])
        todo = iter(indices[prefetch:])
        while pending:
            i, future = pending.popleft()
            following = next(todo, None)
            if following is not None:
                pending.append((following, pool.submit(decode_slice, ordered[following], clf.window, clf.size,
                                                       thumbnail, contract, options.max_pixels)))
            waited = time.perf_counter()
            data = future.result()
            timing["decode_wait"] += time.perf_counter() - waited
            timing["decode_preprocess_cpu"] += data.seconds
            if data.error:
                failed.append(data.error)
            elif data.image is None:
                non_lung += 1
            else:
                batch.append((i, data))
                if len(batch) == batch_size:
                    submit()
        if batch:
            submit()
        while running:
            collect()
    timing.update(inference=sum(calls), pipeline_wall=time.perf_counter() - started)
    draft["timings_s"].update(timing)
    draft["slices_without_lung"] = non_lung
    _report_failures(draft, failed, len(indices))
    return probabilities, used, thumbnails


def predict_studies(clf, paths: list[str | Path], options: StudyOptions | None = None,
                    progress=None) -> list[StudyResult]:
    """Every study under every path, one result each (the studies' errors as rows; the model
    failing raises, as in ``classify_study``);
    ``progress(result)`` after each. ``clf`` may be a ``Future`` of the classifier (a
    model loading in another thread): the first input's headers are read while it
    loads; a load that failed raises here."""
    options = options or StudyOptions()
    results = []
    for path in paths:
        started = time.perf_counter()
        studies = find_studies(path, options.max_bytes, options.max_pixels)
        scan = (time.perf_counter() - started) / len(studies)
        if isinstance(clf, Future):
            clf = clf.result()
        for study in studies:
            try:
                result = classify_study(clf, study, options)
            finally:
                study.close()
            timings = {**result.timings_s, "headers_selection": result.timings_s.get("headers_selection", 0.0) + scan}
            result = replace(result, timings_s=timings)
            results.append(result)
            if progress:
                progress(result)
    return results


CSV_FIELDS = ["input", "study_uid", "patient_id", "accession_number", "series_uid", "slices_total",
              "slices_sampled", "slices_used", "slice_step", "probability", "label", "aggregate", "warnings", "error",
              "not_eligible"]


def csv_row(result: StudyResult) -> dict:
    """One CSV row per study (warnings joined with ' | ')."""
    row = {key: getattr(result, key) for key in CSV_FIELDS}
    row["warnings"] = " | ".join(result.warnings)
    return row


def studies_report(clf, model: str | Path, options: StudyOptions, results: list[StudyResult]) -> StudiesReport:
    """`ctedge predict --study --json`'s document (also the HTTP API's): the model, the engine
    it ran on, the options, one result per study, and a warning when the model's outputs are
    constant over these studies."""
    scored = [r.probability for r in results if r.error is None]
    constant = constant_message(output_spread(scored), len(scored)) if scored else None
    return StudiesReport(model=str(model), engine=getattr(clf, "engine_info", None), runtime=clf.runtime,
                         precision=clf.precision, provider=clf.providers[0], threshold=clf.threshold,
                         options=options.to_dict(), studies=tuple(results), warnings=(constant,) if constant else ())
