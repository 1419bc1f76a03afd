"""Which series of a study gets scored: ranking by usable slices, and the rules
(`SeriesRules`: modality, body part, description, slice thickness, slice count,
ImageType) that make a study "not eligible" rather than an error.

Small phantom series (32-64 px, 12-16 slices) and the brightness stand-in model.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from ctedge.core.phantom_studies import fixed_uid, phantom_slice, write_series
from ctedge.edge import study as st
from ctedge.edge.runtime import Classifier


@pytest.fixture(scope="module")
def clf(model):
    return Classifier(model)


def volume(rng, slices: int, size: int = 48) -> np.ndarray:
    return np.stack([phantom_slice(rng, size, 1.0, False) for _ in range(slices)])


def series_uid(paths) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def only(results):
    assert len(results) == 1, [r.to_dict() for r in results]
    return results[0]


def test_series_are_ranked_by_usable_slices_not_by_files(tmp_path, clf):
    """Issue 29's finding: a bigger series the pipeline cannot use (no rescale; mostly broken
    slices) must not beat a clean smaller one."""
    rng = np.random.default_rng(40)
    uid = fixed_uid(rng)
    clean = write_series(tmp_path, volume(rng, 12), rng, study_uid=uid, description="CLEAN")
    write_series(tmp_path, volume(rng, 16), rng, study_uid=uid, description="NO RESCALE",
                 tags={"RescaleSlope": None, "RescaleIntercept": None})
    mostly_broken = write_series(tmp_path, volume(rng, 20), rng, study_uid=uid, description="MOSTLY BROKEN")
    for path in mostly_broken[:16]:
        ds = pydicom.dcmread(path)
        del ds.RescaleIntercept
        ds.save_as(path)
    result = only(st.predict_studies(clf, [tmp_path]))
    assert result.error is None and result.series_uid == series_uid(clean)
    reasons = {r.description: r.reason for r in result.series_rejected}
    assert "no usable slice" in reasons["NO RESCALE"] and "RescaleSlope" in reasons["NO RESCALE"]
    assert "fewer usable slices than the chosen series (4 < 12)" in reasons["MOSTLY BROKEN"]
