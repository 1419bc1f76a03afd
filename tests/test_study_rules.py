"""Which series of a study gets scored: ranking by usable slices, and the rules
(`SeriesRules`: modality, body part, description, slice thickness, slice count,
ImageType) that make a study "not eligible" rather than an error.

Small phantom series (32-64 px, 12-16 slices) and the brightness stand-in model.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError
from ctedge.core.phantom_studies import fixed_uid, phantom_slice, write_scout, write_series
from ctedge.edge import study as st
from ctedge.edge.runtime import Classifier

runner = CliRunner()


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


# --- the rules -------------------------------------------------------------------------

REAL_CHEST_CT = st.SeriesFacts(modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"),
                               description="LUNG 3.0  B70f", body_part="CHEST", thickness_mm=3.0, slices=99)


def test_default_rules_take_a_real_chest_ct_and_refuse_what_is_not_one():
    """The defaults against the headers of the real series in /work/shared/data/ct-study (Siemens,
    3 mm, 99 slices) and against what sites put in BodyPartExamined and SeriesDescription."""
    rules = st.SeriesRules()
    assert rules.rejection(REAL_CHEST_CT) is None
    for part in ("CHEST", "THORAX", "CHESTABDOMEN", "CHEST_ABDOMEN_PELVIS", "NECKCHEST", "LUNG", "Thorax",
                 "TÓRAX", "TORACE", "WHOLEBODY", "TORSO", "", None):
        assert rules.rejection(SeriesFactsWith(body_part=part)) is None, part
    for part in ("KNEE", "HEAD", "ABDOMEN", "PELVIS", "BRAIN"):
        assert "is not the chest" in rules.rejection(SeriesFactsWith(body_part=part)), part
    for description in ("Topogram  0.6  T20s", "SCOUT", "Dose Report", "Patient Protocol", "MIP 10mm", "Lung MinIP"):
        assert "description-exclude" in rules.rejection(SeriesFactsWith(description=description)), description
    assert rules.rejection(SeriesFactsWith(description="LOW DOSE CHEST 1.25")) is None  # screening CTs stay
    assert "LOCALIZER" in rules.rejection(SeriesFactsWith(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert "DERIVED" in rules.rejection(SeriesFactsWith(image_type=("DERIVED", "SECONDARY", "MPR")))
    assert "not ORIGINAL/PRIMARY" in rules.rejection(SeriesFactsWith(image_type=("ORIGINAL", "OTHER")))
    assert "modality MR, not CT" == rules.rejection(SeriesFactsWith(modality="MR"))
    assert "outside 0.5-10 mm" in rules.rejection(SeriesFactsWith(thickness_mm=20.0))
    assert "fewer than min-slices 8" in rules.rejection(SeriesFactsWith(slices=2))
    assert rules.rejection(st.SeriesFacts()) is None  # nothing known (a PACS's sparse answer): nothing refused


def SeriesFactsWith(**changes) -> st.SeriesFacts:
    from dataclasses import replace

    return replace(REAL_CHEST_CT, **changes)


def test_rules_are_data_checked_when_made():
    rules = st.SeriesRules.from_mapping({"modality": ["ct", "PT"], "min-slices": 20, "body_part": "",
                                         "description-include": "LUNG|CHEST", "max-thickness-mm": 5})
    assert rules.modality == ("CT", "PT") and rules.body_part is None and rules.min_slices == 20
    assert rules.rejection(SeriesFactsWith(body_part="KNEE")) is None  # the rule is off
    assert "does not match description-include" in rules.rejection(SeriesFactsWith(description="ABDOMEN 5mm"))
    flags = st.SeriesRules.from_pairs(["body-part-required=yes", "min-thickness-mm=", "modality=CT,MR"], rules)
    assert flags.body_part_required and flags.min_thickness_mm is None and flags.min_slices == 20
    assert "no BodyPartExamined" in flags.rejection(SeriesFactsWith(body_part=""))
    assert flags.to_dict()["modality"] == ["CT", "MR"]
    for bad, needle in ((["min-slices=many"], "min-slices: 'many' is not a valid value"),
                        (["body-part=(CHEST"], "body-part: '(CHEST' is not a regular expression"),
                        (["colour=red"], "unknown rule 'colour' (known: modality, "),
                        (["min-thickness-mm=5", "max-thickness-mm=1"], "min-thickness-mm 5.0 is above"),
                        (["max-thickness-mm=nan"], "max-thickness-mm: must be a finite number"),
                        (["modality="], "modality: name at least one"),
                        (["min-slices"], "must be KEY=VALUE")):
        with pytest.raises(CtedgeError, match=re.escape(needle)) as caught:
            st.SeriesRules.from_pairs(bad)
        assert caught.value.param == "rules"
    with pytest.raises(CtedgeError, match="min-slices: must be a whole number"):
        st.SeriesRules(min_slices=0)


def test_a_localizer_only_and_an_mr_study_are_not_eligible_with_why(tmp_path, clf):
    rng = np.random.default_rng(41)
    write_scout(tmp_path / "scout", rng, fixed_uid(rng), "P1", size=48)
    write_series(tmp_path / "mr", volume(rng, 12), rng, study_uid=fixed_uid(rng), modality="MR")
    write_series(tmp_path / "knee", volume(rng, 12), rng, study_uid=fixed_uid(rng),
                 tags={"BodyPartExamined": "KNEE", "SliceThickness": 3.0})
    scout, mr, knee = st.predict_studies(clf, [tmp_path / "scout", tmp_path / "mr", tmp_path / "knee"])
    for result in (scout, mr, knee):
        assert result.error is None and result.probability is None and not result.answered
        assert result.not_eligible.startswith("no series meets the rules")
    assert "LOCALIZER" in scout.not_eligible and "modality MR, not CT" in mr.not_eligible
    assert "BodyPartExamined 'KNEE' is not the chest" in knee.not_eligible
    assert knee.no_answer == f"not eligible: {knee.not_eligible}"
    # an eligible series that cannot be classified is an error, not "not eligible"
    write_series(tmp_path / "sagittal", volume(rng, 12), rng, study_uid=fixed_uid(rng), orientation=(0, 1, 0, 0, 0, -1))
    sagittal = only(st.predict_studies(clf, [tmp_path / "sagittal"]))
    assert sagittal.not_eligible is None and "not axial" in sagittal.error


def test_predict_study_takes_rules_from_flags_and_reports_not_eligible(tmp_path, model):
    rng = np.random.default_rng(42)
    write_series(tmp_path / "s", volume(rng, 12), rng, study_uid=fixed_uid(rng), tags={"BodyPartExamined": "CHEST"})
    out = tmp_path / "out.json"
    done = runner.invoke(app, ["predict", str(model), str(tmp_path / "s"), "--study", "--json", str(out),
                               "--rule", "body-part=KNEE|ANKLE", "--rule", "min-slices=10"])
    assert done.exit_code == 0, done.output  # not eligible is an outcome, not a failure
    assert "not eligible" in done.output and "1 of 1 stud(ies) not eligible" in done.output
    document = json.loads(out.read_text())
    study = document["studies"][0]
    assert study["error"] is None and "'CHEST' is not the chest" in study["not_eligible"]
    assert document["options"]["rules"]["body-part"] == "KNEE|ANKLE" and document["options"]["rules"]["min-slices"] == 10
    bad = runner.invoke(app, ["predict", str(model), str(tmp_path / "s"), "--study", "--rule", "min-slices=x"])
    assert bad.exit_code == 2 and "--rule min-slices: 'x' is not a valid value" in bad.output


def test_the_nodes_rules_table_and_flags(tmp_path, model):
    """`ctedge serve`'s [rules] table in the TOML, --rule flags on top, a bad rule named with its file."""
    from ctedge.edge.serve.config import load_config

    toml = tmp_path / "serve.toml"
    toml.write_text(f'model = "{model}"\n[rules]\nmin-slices = 30\nbody-part = "CHEST"\nmodality = ["CT"]\n')
    config = load_config(toml, {"rules": ["min-slices=40"]})
    assert config.rules.min_slices == 40 and config.rules.body_part == "CHEST"
    assert load_config(None, {"model": model}).rules == st.SeriesRules()
    toml.write_text(f'model = "{model}"\n[rules]\nmin-slices = "many"\n')
    with pytest.raises(CtedgeError, match=re.escape(f"{toml}: [rules] min-slices: 'many' is not a valid value")):
        load_config(toml, {})
    toml.write_text(f'model = "{model}"\nrules = 5\n')
    with pytest.raises(CtedgeError, match="rules must be a table"):
        load_config(toml, {})
    done = runner.invoke(app, ["serve", str(model), "--rule", "body-part=("])
    assert done.exit_code == 2 and "--rule body-part: '(' is not a regular expression" in done.output
