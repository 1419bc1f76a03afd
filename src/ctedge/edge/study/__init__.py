"""A patient's answer from a whole CT study: DICOM series (or NIfTI) in, one decision out.

TensorFlow-free (numpy, opencv, pydicom, an engine through ``Classifier``); nibabel
and pydicom's compressed-pixel plugins are optional extras imported when needed.
Stages on data, each in its own module:

1. **read** (``read``, ``nifti``): the only stage that takes paths. Folders, .zip,
   NIfTI, or pydicom datasets / bytes already in memory (``study_from_datasets``,
   ``study_from_bytes``) become ``Study`` objects grouped by StudyInstanceUID, then
   SeriesInstanceUID; regular files only, within the byte budget. ``SliceRef`` and
   ``Study`` live in ``records``, which both readers import.
2. **select** (``rules``, ``select``): the site's rules on header data (``SeriesRules``:
   a study with no series meeting them is not eligible), then the series to classify,
   its slices ordered along the slice normal, every ``step``-th sampled.
3. **hu** (``hu``): each sampled slice to HU through ``ctedge.core.dicom.dataset_hu``
   (the one DICOM path, also used by single images), the lung criterion.
4. **pipeline** (``pipeline``): decoding in worker threads overlapped with inference
   (single slices, calls at once, under the throughput hint; else batches); too few
   positions or too many failed slices give an error.
5. **aggregate** (``aggregate``): the patient's probability (default: mean of the
   top ``k`` slices), thresholded with the model's metadata threshold.

Results are the frozen dataclasses of ``ctedge.core.results`` (``StudyResult``,
``SliceScore``, ``RejectedSeries``, ``StudiesReport``).
"""

from ctedge.core.results import RejectedSeries, SliceScore, StudiesReport, StudyResult
from ctedge.edge.study.aggregate import AGGREGATES, DEFAULT_TOP_K, aggregate
from ctedge.edge.study.bench import STAGES, TARGET_RATIO, bench_study
from ctedge.edge.study.export import export_slices
from ctedge.edge.study.hu import LUNG_HU, LUNG_MIN_FRACTION, decode_slice, lung_fraction, slice_hu
from ctedge.edge.study.pipeline import (
    CSV_FIELDS,
    DEFAULT_MAX_SLICES,
    MIN_POSITIONS,
    STUDY_HINT,
    StudyOptions,
    classify_study,
    csv_row,
    predict_studies,
    studies_report,
)
from ctedge.edge.study.read import (
    DEFAULT_MAX_BYTES,
    find_studies,
    header,
    study_from_bytes,
    study_from_datasets,
)
from ctedge.edge.study.records import SliceRef, Study
from ctedge.edge.study.rules import DEFAULT_RULES, SeriesFacts, SeriesRules
from ctedge.edge.study.select import (
    Selection,
    order_slices,
    sample_indices,
    sampling_text,
    select_series,
    series_problem,
    usability_problem,
)

__all__ = ["AGGREGATES", "STUDY_HINT", "studies_report", "CSV_FIELDS", "DEFAULT_MAX_BYTES", "DEFAULT_RULES", "Selection",
           "SeriesFacts", "SeriesRules", "usability_problem", "DEFAULT_MAX_SLICES", "DEFAULT_TOP_K", "LUNG_HU",
           "LUNG_MIN_FRACTION", "MIN_POSITIONS", "STAGES", "TARGET_RATIO", "RejectedSeries", "SliceRef",
           "SliceScore", "StudiesReport", "Study", "StudyOptions", "StudyResult", "aggregate", "bench_study",
           "classify_study", "csv_row", "decode_slice", "export_slices", "find_studies", "header", "lung_fraction",
           "order_slices", "predict_studies", "sample_indices", "sampling_text", "select_series", "series_problem", "slice_hu",
           "study_from_bytes", "study_from_datasets"]
