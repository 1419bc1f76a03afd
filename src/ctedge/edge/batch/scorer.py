"""``StudyScorer``: Ray Data's batch-inference callable for CT studies. Each actor loads
the model once; each batch of study references (local paths or URLs) becomes one Arrow
row per study, the ``StudyResult`` that ``predict --study`` gives, errors as rows.

It needs no Ray to run: ``StudyScorer(model)({"input": np.array([...])})`` scores a batch
in the calling process, as the tests and the single-process benchmark do.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctedge.core.errors import CtedgeError
from ctedge.core.results import StudyResult
from ctedge.edge.batch.storage import FetchError, fetch, filesystem, is_url
from ctedge.edge.batch.table import results_table
from ctedge.edge.runtime import Classifier
from ctedge.edge.study import STUDY_HINT, StudyOptions, predict_studies

INPUT = "input"  # the column of study references a batch holds
LIST_SUFFIX = ".txt"  # an input naming a list of references, one a line
DEFAULT_MAX_FETCH_BYTES = 4 * 2**30  # a stored study (file or folder) copied for scoring, at most


def actor_cpus() -> int | None:
    """The CPUs Ray gave the actor this runs in (None outside a Ray actor): onnxruntime's
    and the decoder's threads, so actors on one machine do not oversubscribe it."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # the driver
        return None
    cpus = context.get_assigned_resources().get("CPU")
    return max(1, int(cpus)) if cpus else None


class StudyScorer:
    """Map with ``Dataset.map_batches(StudyScorer, fn_constructor_kwargs={"model": ...},
    compute=ActorPoolStrategy(size=N), num_cpus=K, batch_format="numpy")`` over a dataset
    whose ``input`` column holds study references (folders, .zip, NIfTI; local paths or
    URLs). Returns an Arrow table of ``ctedge.edge.batch.STUDY_SCHEMA``, one row per study.

    ``threads`` (default: the actor's CPUs) drives onnxruntime and the slice decoders;
    ``max_fetch_bytes`` bounds what one stored input may copy to local disk."""

    def __init__(self, model: str | Path, options: StudyOptions | None = None, *, runtime: str = "auto",
                 precision: str | None = None, provider: str = "auto", threads: int | None = None,
                 cache_dir: str | None = None, max_fetch_bytes: int = DEFAULT_MAX_FETCH_BYTES):
        threads = threads or actor_cpus()
        options = options or StudyOptions()
        if options.workers is None and threads:
            options = replace(options, workers=threads)
        self.options, self.max_fetch_bytes = options, max_fetch_bytes
        self.classifier = Classifier(model, provider, threads, runtime=runtime, precision=precision,
                                     cache_dir=cache_dir, fixed_batch=options.batch_size,
                                     max_pixels=options.max_pixels, hint=STUDY_HINT)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        results = [result for reference in batch[INPUT]
                   for result in score_reference(self.classifier, str(reference), self.options,
                                                 self.max_fetch_bytes)]
        return results_table(results)


def _relabel(result: StudyResult, local: str, reference: str) -> StudyResult:
    """A result of a fetched copy named after where the study is stored."""
    def named(text: str | None) -> str | None:
        return text.replace(local, reference) if text else text

    return replace(result, input=reference, error=named(result.error),
                   warnings=tuple(map(named, result.warnings)),
                   top_slices=tuple(replace(s, source=named(s.source)) for s in result.top_slices),
                   slices=tuple(replace(s, source=named(s.source)) for s in result.slices))


def _score_stored(clf, reference: str, options: StudyOptions, max_fetch_bytes: int) -> list[StudyResult]:
    with tempfile.TemporaryDirectory(prefix="ctedge-fetch-") as folder:
        started = time.perf_counter()
        try:
            local = fetch(reference, folder, max_fetch_bytes)
        except FetchError as exc:
            return [StudyResult(input=reference, error=str(exc))]
        fetched = time.perf_counter() - started
        return [replace(_relabel(result, local, reference), timings_s={**result.timings_s, "fetch": fetched})
                for result in predict_studies(clf, [local], options)]


def score_reference(clf, reference: str, options: StudyOptions,
                    max_fetch_bytes: int = DEFAULT_MAX_FETCH_BYTES) -> list[StudyResult]:
    """Every study of one input, one result each; whatever goes wrong is the input's error row."""
    try:
        if not is_url(reference):
            return predict_studies(clf, [reference], options)
        fs, path = filesystem(reference)
        if fs.type_name == "local":  # file://: read where it is
            return [_relabel(result, path, reference) for result in predict_studies(clf, [path], options)]
        return _score_stored(clf, reference, options, max_fetch_bytes)
    except FetchError as exc:
        return [StudyResult(input=reference, error=str(exc))]
    except Exception as exc:  # one study's failure (a decoder bug, an engine error) is its row, not the job's end
        return [StudyResult(input=reference, error=f"could not be scored ({exc.__class__.__name__}: {exc})")]


def _list_entries(listing: str) -> list[str]:
    """The references a list file names: one a line, blank lines and # comments skipped,
    relative paths taken from the list's folder."""
    try:
        fs, path = filesystem(listing)
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8-sig")
    except (OSError, FetchError) as exc:
        raise CtedgeError(f"{listing}: cannot be read ({exc})") from None
    except UnicodeDecodeError as exc:
        raise CtedgeError(f"{listing}: not a UTF-8 text list of studies ({exc.reason} at byte {exc.start})") from None
    base = listing.rsplit("/", 1)[0] if is_url(listing) else os.path.dirname(os.path.abspath(listing))
    entries = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        entries.append(entry if is_url(entry) or os.path.isabs(entry) else f"{base}/{entry}")
    return entries


def read_references(inputs: list[str]) -> tuple[list[str], int]:
    """Study references from the inputs given (``.txt`` files list them), each once and in
    order, local paths made absolute (actors may run elsewhere); and how many repeats were dropped."""
    references: list[str] = []
    for given in inputs:
        entries = _list_entries(given) if given.lower().endswith(LIST_SUFFIX) else [given]
        if given.lower().endswith(LIST_SUFFIX) and not entries:
            raise CtedgeError(f"{given}: lists no study")
        references += [entry if is_url(entry) else os.path.abspath(entry) for entry in entries]
    unique = list(dict.fromkeys(references))
    return unique, len(references) - len(unique)
