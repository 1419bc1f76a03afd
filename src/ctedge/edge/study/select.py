"""Stage 2, select: which series of a study to classify (rules on header data, like
MONAI Deploy's series selector), the order of its slices and which to sample.

First the site's rules (``rules.SeriesRules``: modality, ImageType, body part,
description, slice thickness, slice count); a study where no series meets them is not
eligible (an outcome, not an error). Then what classifying needs: an image (Rows and
Columns, one frame), axial (slice normal within 25 degrees of the patient's z axis), at
least ``MIN_SLICES`` usable slices (a rescale, valid geometry, the series' majority
matrix size); of those, the series with the most usable slices. A series asked for by
UID overrides the choice (not the checks). Every rejected series keeps its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ctedge.core.results import RejectedSeries
from ctedge.edge.study.records import SliceRef, Study
from ctedge.edge.study.rules import DEFAULT_RULES, SeriesFacts, SeriesRules

MIN_SLICES = 3  # fewer is a scout, a key image or a dose screen, not a chest CT
AXIAL_MIN_COS = math.cos(math.radians(25))  # |normal . z| for an axial series
GAP_FACTOR = 1.5  # a spacing over 1.5 x the median is reported as a gap
DUPLICATE_MM = 0.01


def normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    length = np.linalg.norm(n)
    return n / length if length > 0 else n


def _image_problem(first: SliceRef) -> str | None:
    if not first.rows or not first.cols:
        return "no image (no Rows/Columns: not an image object)"
    if first.frames > 1:
        return f"multi-frame object ({first.frames} frames), not supported"
    return None


def _slice_problem(ref: SliceRef) -> str | None:
    """Why one slice cannot be used; None when it can."""
    if ref.problem is not None:
        return ref.problem
    if not ref.has_rescale:
        return "no RescaleSlope/RescaleIntercept, so its values cannot be converted to HU"
    if ref.orientation is None or ref.position is None:
        return "no ImageOrientationPatient/ImagePositionPatient"
    return None


def usability_problem(refs: list[SliceRef]) -> str | None:
    """Why an eligible series cannot be classified (no image, no usable slice, not axial,
    too few usable slices); None when it can."""
    problem = _image_problem(refs[0])
    if problem:
        return problem
    usable = _usable(refs, [])
    if not usable:
        return f"no usable slice ({_slice_problem(refs[0])})"
    cos = abs(float(normal(usable[0].orientation)[2]))
    if cos < AXIAL_MIN_COS:
        return f"not axial (slice normal {math.degrees(math.acos(min(cos, 1.0))):.0f} degrees from z)"
    if len(usable) < MIN_SLICES:
        return f"{len(usable)} usable slice(s), fewer than {MIN_SLICES}"
    return None


def series_problem(refs: list[SliceRef], rules: SeriesRules = DEFAULT_RULES) -> str | None:
    """Why a series is not the axial CT to classify (a rule, or a problem with its slices);
    None when it qualifies."""
    return rules.rejection(SeriesFacts.of_slices(refs)) or usability_problem(refs)


@dataclass(frozen=True)
class Selection:
    """The series chosen (None: none), every other one with its reason, and, when no series
    met the rules (and none was asked for by UID), why the study is not eligible."""

    series_uid: str | None
    rejected: list[RejectedSeries]
    not_eligible: str | None = None


def _rejected(uid: str, refs: list[SliceRef], reason: str) -> RejectedSeries:
    return RejectedSeries(series_uid=uid, slices=len(refs), description=refs[0].description, reason=reason)


def select_series(study: Study, series_uid: str | None = None, rules: SeriesRules = DEFAULT_RULES) -> Selection:
    """The series to classify: among those that meet ``rules`` and can be classified, the
    one with the most usable slices (or the one asked for by UID)."""
    rejected, candidates, eligible = [], [], 0
    for uid, refs in study.series.items():
        if series_uid is not None and uid != series_uid:
            rejected.append(_rejected(uid, refs, "not the series asked for (--series)"))
            continue
        reason = rules.rejection(SeriesFacts.of_slices(refs))
        eligible += reason is None
        reason = reason or usability_problem(refs)
        if reason is None:
            candidates.append((len(_usable(refs, [])), uid))
        else:
            rejected.append(_rejected(uid, refs, reason))
    if not candidates:
        why = None
        if series_uid is None and study.series and not eligible:
            why = "no series meets the rules (" + "; ".join(
                f"{r.description or r.series_uid}: {r.reason}" for r in rejected) + ")"
        return Selection(None, rejected, why)
    candidates.sort(key=lambda c: (-c[0], c[1]))
    best = candidates[0][0]
    for count, uid in candidates[1:]:
        rejected.append(_rejected(uid, study.series[uid], f"fewer usable slices than the chosen series "
                                                          f"({count} < {best})"))
    return Selection(candidates[0][1], rejected)


def _usable(refs: list[SliceRef], warnings: list[str]) -> list[SliceRef]:
    usable = []
    for ref in refs:
        problem = _slice_problem(ref)
        if problem is None:
            usable.append(ref)
        else:
            warnings.append(f"{ref.name}: {problem}; slice skipped")
    if not usable:
        return []
    sizes: dict[tuple[int, int], int] = {}
    for ref in usable:
        sizes[(ref.rows, ref.cols)] = sizes.get((ref.rows, ref.cols), 0) + 1
    size = max(sizes, key=sizes.get)
    for ref in usable:
        if (ref.rows, ref.cols) != size:
            warnings.append(f"{ref.name}: matrix {ref.rows}x{ref.cols}, not the series' "
                            f"{size[0]}x{size[1]}; slice skipped")
    return [r for r in usable if (r.rows, r.cols) == size]


def order_slices(refs: list[SliceRef]) -> tuple[list[SliceRef], np.ndarray, list[str]]:
    """Usable slices sorted along the slice normal, their positions (mm) and warnings;
    duplicates and slices of another matrix size are dropped, gaps reported."""
    warnings: list[str] = []
    usable = _usable(refs, warnings)
    if not usable:
        return [], np.zeros(0), warnings
    n = normal(usable[0].orientation)
    positions = np.array([float(np.dot(r.position, n)) for r in usable])
    order = np.argsort(positions, kind="stable")
    usable, positions = [usable[i] for i in order], positions[order]
    keep = np.ones(len(usable), bool)
    keep[1:] = np.diff(positions) > DUPLICATE_MM
    if not keep.all():
        dropped = [usable[i].name for i in np.flatnonzero(~keep)]
        warnings.append(f"{len(dropped)} slice(s) at a duplicate position skipped (e.g. {dropped[0]})")
        usable, positions = [r for r, k in zip(usable, keep) if k], positions[keep]
    return usable, positions, warnings + find_gaps(positions)


def find_gaps(positions: np.ndarray) -> list[str]:
    """Each spacing over ``GAP_FACTOR`` x the median between sorted slice positions, in words."""
    if len(positions) <= 2:
        return []
    spacing = np.diff(positions)
    median = float(np.median(spacing))
    return [f"gap of {spacing[i]:.1f} mm (median spacing {median:.1f} mm) between {positions[i]:.1f} and "
            f"{positions[i + 1]:.1f} mm" for i in np.flatnonzero(spacing > GAP_FACTOR * median)]


def sample_indices(total: int, step: int | None, max_slices: int) -> tuple[list[int], int]:
    """Every ``step``-th index, centred in the series; step defaults to the smallest
    that keeps at most ``max_slices``."""
    if step is None:
        step = max(1, math.ceil(total / max_slices))
    start = ((total - 1) % step) // 2
    return list(range(start, total, step)), step


def sampling_text(step: int) -> str:
    """How a series was sampled, in words ("every slice", "1 slice in 3")."""
    return "every slice" if step == 1 else f"1 slice in {step}"
