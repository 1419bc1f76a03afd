"""Studies pulled from a PACS and classified as `predict --study` classifies a folder.

For each study the query found: its series are listed (series-level C-FIND or QIDO-RS),
judged by the rules on what the PACS says of them, and only the best candidate (the
most instances) is retrieved into a temp folder, classified, and removed. When the
retrieved files show it cannot be used after all (a localizer the series-level answer
did not reveal, no usable slice), the next candidate is retrieved. A study the PACS
fails to return is an error row; the others go on.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from ctedge.core.results import RejectedSeries, StudyResult
from ctedge.edge.pacs.common import PullError, SeriesRef, StudyRef
from ctedge.edge.study.pipeline import StudyOptions, classify_study
from ctedge.edge.study.read import find_studies
from ctedge.edge.study.rules import SeriesRules


class StudySource(Protocol):
    """A PACS to pull from (``DimseSource``, ``DicomWebSource``)."""

    name: str

    def describe(self, study: StudyRef) -> str: ...
    def close(self) -> None: ...
    def find_studies(self, query: dict[str, str]) -> list[StudyRef]: ...
    def find_series(self, study: StudyRef) -> list[SeriesRef]: ...
    def fetch_series(self, study: StudyRef, series_uid: str, folder: Path) -> int: ...


def choose_series(series: list[SeriesRef], rules: SeriesRules,
                  series_uid: str | None = None) -> tuple[list[SeriesRef], list[RejectedSeries]]:
    """The series worth retrieving, best first (most instances, then UID, as selection on files
    ranks them), and the others with the reason the PACS's answer gave."""
    candidates, rejected = [], []
    for ref in series:
        reason = "not the series asked for (--series)" if series_uid and ref.series_uid != series_uid \
            else rules.rejection(ref.facts())
        if reason is None:
            candidates.append(ref)
        else:
            rejected.append(RejectedSeries(series_uid=ref.series_uid, slices=ref.instances or 0,
                                           description=ref.description or "", reason=reason))
    candidates.sort(key=lambda ref: (-(ref.instances or 0), ref.series_uid))
    return candidates, rejected


def pull_studies(clf, source: StudySource, query: dict[str, str], options: StudyOptions | None = None,
                 progress=None) -> list[StudyResult]:
    """Every study matching ``query``, one result each (``progress(result)`` after each).
    PullError when the query itself fails or matches too many studies."""
    options = options or StudyOptions()
    results = []
    for study in source.find_studies(query):
        result = pull_study(clf, source, study, options)
        results.append(result)
        if progress:
            progress(result)
    return results


def pull_study(clf, source: StudySource, study: StudyRef, options: StudyOptions) -> StudyResult:
    """One study from the PACS to one result; its problems become the row's error (never
    raised; the model failing raises, as in ``classify_study``)."""
    name = source.describe(study)
    row = dict(input=name, study_uid=study.study_uid, patient_id=study.patient_id,
               accession_number=study.accession_number, study_date=study.study_date)
    try:
        series = source.find_series(study)
    except PullError as exc:
        return StudyResult(**row, error=str(exc))
    candidates, rejected = choose_series(series, options.rules, options.series_uid)
    if not candidates:
        if options.series_uid is None and series:
            return StudyResult(**row, series_rejected=tuple(rejected), not_eligible=_not_eligible(rejected))
        asked = f"series {options.series_uid} is not usable or not in this study" if options.series_uid \
            else "the PACS lists no series for this study"
        return StudyResult(**row, series_rejected=tuple(rejected), error=asked + _reasons(rejected))
    for n, candidate in enumerate(candidates):
        try:
            result = _retrieve_and_classify(clf, source, study, candidate, options, name)
        except PullError as exc:
            return StudyResult(**row, series_rejected=tuple(rejected), error=str(exc))
        rejected += result.series_rejected
        if result.series_uid or not result.series_rejected:
            break  # classified (an answer, or an error of its slices), or nothing to try another series for
    untried = [RejectedSeries(series_uid=c.series_uid, slices=c.instances or 0, description=c.description or "",
                              reason="not retrieved: the series with more instances was classified")
               for c in candidates[n + 1:]]
    result = replace(result, series_rejected=tuple(rejected + untried))
    if result.not_eligible is not None:
        result = replace(result, not_eligible=_not_eligible(result.series_rejected))
    return result


def _retrieve_and_classify(clf, source: StudySource, study: StudyRef, series: SeriesRef, options: StudyOptions,
                           name: str) -> StudyResult:
    """One series into a temp folder, classified there, the folder removed; PullError when the
    PACS does not return it as asked."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctedge-pull-") as folder:
        source.fetch_series(study, series.series_uid, Path(folder))
        retrieved = time.perf_counter() - started
        found = [s for s in find_studies(folder, options.max_bytes, options.max_pixels)
                 if s.study_uid == study.study_uid]
        if not found:
            raise PullError(f"{source.name}: series {series.series_uid} came back without a readable instance")
        try:
            result = classify_study(clf, found[0], options)
        finally:
            found[0].close()
    return _renamed(result, folder, name, retrieved)


def _renamed(result: StudyResult, folder: str, name: str, retrieved: float) -> StudyResult:
    """A result named after the PACS's study, with no temp path in it."""
    def named(text: str) -> str:
        return text.replace(folder, name)

    def renamed(score):
        return replace(score, source=named(score.source))

    return replace(result, input=name, slices=tuple(map(renamed, result.slices)),
                   top_slices=tuple(map(renamed, result.top_slices)), warnings=tuple(map(named, result.warnings)),
                   error=named(result.error) if result.error else None,
                   timings_s={"retrieve": retrieved, **result.timings_s})


def _reasons(rejected) -> str:
    return " (" + "; ".join(f"{r.description or r.series_uid}: {r.reason}" for r in rejected) + ")" if rejected \
        else ""


def _not_eligible(rejected) -> str:
    return "no series meets the rules" + _reasons(rejected)
