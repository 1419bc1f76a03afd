"""``StudyResult`` as Arrow: one row per study, the columns of ``predict --study --json``'s
studies rows, typed (lists of structs for slices, maps for attributes and timings), so a
Parquet of an archive reads back as the same ``StudyResult`` objects.

The schema is fixed rather than inferred: a batch of error rows (empty lists, no
probability) has the same column types as a batch of answers, so part files written by
different actors form one data set.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ctedge.core.results import RejectedSeries, SliceScore, StudyResult

SLICE = pa.struct([("index", pa.int64()), ("position_mm", pa.float64()), ("probability", pa.float64()),
                   ("sop_instance_uid", pa.string()), ("source", pa.string())])
REJECTED = pa.struct([("series_uid", pa.string()), ("slices", pa.int64()), ("description", pa.string()),
                      ("reason", pa.string())])
TEXT_MAP = pa.map_(pa.string(), pa.string())

STUDY_SCHEMA = pa.schema([
    pa.field("input", pa.string(), nullable=False),
    ("study_uid", pa.string()), ("patient_id", pa.string()), ("accession_number", pa.string()),
    ("study_date", pa.string()), ("attributes", TEXT_MAP), ("series_uid", pa.string()),
    ("series_description", pa.string()), ("slices_total", pa.int64()), ("positions", pa.int64()),
    ("slices_sampled", pa.int64()), ("slices_failed", pa.int64()), ("slices_without_lung", pa.int64()),
    ("slices_used", pa.int64()), ("slice_step", pa.int64()), ("probability", pa.float64()), ("label", pa.string()),
    ("threshold", pa.float64()), ("aggregate", pa.string()), ("top_slices", pa.list_(SLICE)),
    ("slices", pa.list_(SLICE)), ("series_rejected", pa.list_(REJECTED)), ("warnings", pa.list_(pa.string())),
    ("error", pa.string()), ("not_eligible", pa.string()), ("timings_s", pa.map_(pa.string(), pa.float64())),
])


def results_table(results: list[StudyResult], metadata: dict[str, str] | None = None) -> pa.Table:
    """Studies as an Arrow table of ``STUDY_SCHEMA`` (thumbnails are a display matter, left out);
    ``metadata`` becomes the schema's key-value metadata."""
    table = pa.Table.from_pylist([result.to_dict() for result in results], schema=STUDY_SCHEMA)
    return table.replace_schema_metadata(metadata) if metadata else table


def _pairs(value: Any) -> dict:
    """An Arrow map as Python gives it back (a list of pairs) as a dict."""
    return dict(value or [])


def result_from_row(row: dict[str, Any]) -> StudyResult:
    """One row of ``STUDY_SCHEMA`` (``Table.to_pylist()``) back as the ``StudyResult`` it was."""
    data = {key: row[key] for key in StudyResult.keys()}
    data.update(attributes=_pairs(row["attributes"]), timings_s=_pairs(row["timings_s"]),
                top_slices=tuple(SliceScore(**s) for s in row["top_slices"] or ()),
                slices=tuple(SliceScore(**s) for s in row["slices"] or ()),
                series_rejected=tuple(RejectedSeries(**s) for s in row["series_rejected"] or ()),
                warnings=tuple(row["warnings"] or ()))
    return StudyResult(**data)
