"""Stage 2, select: which series of a study to classify (rules on header data, like
MONAI Deploy's series selector), the order of its slices and which to sample.

Rules: Modality CT; ImageType ORIGINAL and PRIMARY (not LOCALIZER, DERIVED,
SECONDARY); axial (slice normal within 25 degrees of the patient's z axis); at
least ``MIN_SLICES`` usable slices; then the one with the most slices. A series
asked for by UID overrides. Every rejected series keeps its reason.
"""

from __future__ import annotations

import math

import numpy as np

from ctedge.core.results import RejectedSeries
from ctedge.edge.study.records import SliceRef, Study

MIN_SLICES = 3  # fewer is a scout, a key image or a dose screen, not a chest CT
AXIAL_MIN_COS = math.cos(math.radians(25))  # |normal . z| for an axial series
BAD_IMAGE_TYPES = ("LOCALIZER", "DERIVED", "SECONDARY")
GAP_FACTOR = 1.5  # a spacing over 1.5 x the median is reported as a gap
DUPLICATE_MM = 0.01


def normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    length = np.linalg.norm(n)
    return n / length if length > 0 else n


def _type_problem(first: SliceRef) -> str | None:
    if first.modality != "CT":
        return f"modality {first.modality or 'missing'}, not CT"
    bad = [t for t in first.image_type if t in BAD_IMAGE_TYPES]
    if bad:
        return f"ImageType {'/'.join(first.image_type)} ({bad[0]})"
    if first.image_type and not {"ORIGINAL", "PRIMARY"} <= set(first.image_type[:2]):
        return f"ImageType {'/'.join(first.image_type)} is not ORIGINAL/PRIMARY"
    if not first.rows or not first.cols:
        return "no image (no Rows/Columns: not an image object)"
    if first.frames > 1:
        return f"multi-frame object ({first.frames} frames), not supported"
    return None


def series_problem(refs: list[SliceRef]) -> str | None:
    """Why a series is not the axial CT to classify; None when it qualifies."""
    problem = _type_problem(refs[0])
    if problem:
        return problem
    usable = [r for r in refs if r.problem is None and r.orientation and r.position]
    if not usable:
        broken = next((r.problem for r in refs if r.problem), None)
        return (f"no usable slice ({broken})" if broken
                else "no slice with ImageOrientationPatient and ImagePositionPatient")
    cos = abs(float(normal(usable[0].orientation)[2]))
    if cos < AXIAL_MIN_COS:
        return f"not axial (slice normal {math.degrees(math.acos(min(cos, 1.0))):.0f} degrees from z)"
    if len(usable) < MIN_SLICES:
        return f"{len(usable)} usable slice(s), fewer than {MIN_SLICES}"
    return None


def select_series(study: Study, series_uid: str | None = None) -> tuple[str | None, list[RejectedSeries]]:
    """The series to classify and every rejected one with its reason."""
    rejected, candidates = [], []
    for uid, refs in study.series.items():
        reason = "not the series asked for (--series)" if series_uid is not None and uid != series_uid \
            else series_problem(refs)
        if reason is None:
            candidates.append((len(refs), uid))
        else:
            rejected.append(RejectedSeries(series_uid=uid, slices=len(refs), description=refs[0].description,
                                           reason=reason))
    if not candidates:
        return None, rejected
    candidates.sort(key=lambda c: (-c[0], c[1]))
    for count, uid in candidates[1:]:
        rejected.append(RejectedSeries(series_uid=uid, slices=count, description=study.series[uid][0].description,
                                       reason=f"fewer slices than the chosen series ({count} < {candidates[0][0]})"))
    return candidates[0][1], rejected


def _usable(refs: list[SliceRef], warnings: list[str]) -> list[SliceRef]:
    usable = []
    for ref in refs:
        if ref.problem is not None:
            warnings.append(f"{ref.name}: {ref.problem}; slice skipped")
        elif not ref.has_rescale:
            warnings.append(f"{ref.name}: no RescaleSlope/RescaleIntercept, so its values cannot be "
                            "converted to HU; slice skipped")
        elif ref.orientation is None or ref.position is None:
            warnings.append(f"{ref.name}: no ImageOrientationPatient/ImagePositionPatient; slice skipped")
        else:
            usable.append(ref)
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
    if len(positions) > 2:
        spacing = np.diff(positions)
        median = float(np.median(spacing))
        for i in np.flatnonzero(spacing > GAP_FACTOR * median):
            warnings.append(f"gap of {spacing[i]:.1f} mm (median spacing {median:.1f} mm) between "
                            f"{positions[i]:.1f} and {positions[i + 1]:.1f} mm")
    return usable, positions, warnings


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
