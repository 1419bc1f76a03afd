import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ctedge.cli import app

runner = CliRunner()


def texture(seed: int, size: int = 192) -> np.ndarray:
    """A distinct, structured gray image (smoothed noise)."""
    noise = np.random.default_rng(seed).uniform(0, 255, (size, size)).astype(np.float32)
    return cv2.normalize(cv2.GaussianBlur(noise, (0, 0), 3.0), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


COPIES = {
    "reencoded": lambda g: cv2.imdecode(cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], 0),
    "resized": lambda g: cv2.resize(g, (300, 300)),
    "cropped": lambda g: g[6:-6, 6:-6],
    "flipped": lambda g: g[:, ::-1],
    "rotated": lambda g: cv2.warpAffine(g, cv2.getRotationMatrix2D((96, 96), 5, 1.0), (192, 192)),
}


def write_data(root, copy_name=None):
    """Ten distinct images per class; optionally one copy of a training image in val."""
    for cls in ("CT_COVID", "CT_NonCOVID"):
        (root / cls).mkdir(parents=True)
    splits = root / "splits"
    splits.mkdir()
    lists = {}
    for i in range(20):
        cls = "CT_COVID" if i % 2 else "CT_NonCOVID"
        name = f"img{i}.png"
        cv2.imwrite(str(root / cls / name), texture(i))
        lists.setdefault(("train" if i < 14 else "val", cls), []).append(name)
    if copy_name:
        cv2.imwrite(str(root / "CT_COVID" / "copy.png"), np.ascontiguousarray(COPIES[copy_name](texture(1))))
        lists[("val", "CT_COVID")].append("copy.png")
    for (part, cls), names in lists.items():
        (splits / f"{part}_{cls.removeprefix('CT_')}.txt").write_text("\n".join(names))
    return root


@pytest.mark.parametrize("copy_name", sorted(COPIES))
def test_each_kind_of_copy_across_splits_is_leakage(tmp_path, copy_name):
    root = write_data(tmp_path, copy_name)
    result = runner.invoke(app, ["audit", str(root), "--split-dir", str(root / "splits"), "--image-size", "64",
                                 "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 4, result.output
    report = json.loads((tmp_path / "a.json").read_text())
    pairs = [(p["a"].split("/")[-1], p["b"].split("/")[-1]) for p in report["near_duplicates"]]
    assert pairs in ([("img1.png", "copy.png")], [("copy.png", "img1.png")])
    assert report["near_duplicates"][0]["cross_split"]


def test_clean_data_exits_0_and_reports_balance_and_baseline(tmp_path):
    root = write_data(tmp_path)
    marked = cv2.cvtColor(texture(3), cv2.COLOR_GRAY2BGR)
    cv2.rectangle(marked, (10, 10), (60, 60), (0, 0, 255), 2)
    cv2.imwrite(str(root / "CT_COVID" / "img3.png"), marked)
    (root / "CT_NonCOVID" / "img0.png").write_text("broken")
    result = runner.invoke(app, ["audit", str(root), "--split-dir", str(root / "splits"),
                                 "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["near_duplicates"] == [] and not report["leakage"]
    assert [p.split("/")[-1] for p in report["annotated"]] == ["img3.png"]
    assert [u["path"].split("/")[-1] for u in report["unreadable"]] == ["img0.png"]
    assert report["balance"]["train"]["images"] == 14 and report["balance"]["val"]["positive"] == 3
    assert len(report["too_small"]) == 19  # 192 px < the default 300 px input
    assert 0.0 <= report["shortcut_baseline"]["val"]["auc"] <= 1.0


def test_demo_phantoms_carry_no_file_size_shortcut(phantom_data):
    sizes = {p.parent.name: set() for p in phantom_data.rglob("*.png")}
    for p in phantom_data.rglob("*.png"):
        sizes[p.parent.name].add(p.stat().st_size)
    assert sizes["CT_COVID"] == sizes["CT_NonCOVID"] and len(sizes["CT_COVID"]) == 1


def test_phantom_patients_are_not_near_duplicates_of_each_other(tmp_path):
    """`demo --study` draws each patient's anatomy: the same slice of different patients
    is no near-duplicate for the audit (it once found 842 such pairs across the demo's
    splits), while the default anatomy is the phantom the other tests know."""
    from ctedge.core.data import DataOptions
    from ctedge.core.imageio import DEFAULT_WINDOW, hu_to_gray
    from ctedge.core.phantom_studies import Anatomy, phantom_slice
    from ctedge.evaluation.audit import audit

    rng = np.random.default_rng(0)
    for patient in range(12):
        folder = tmp_path / ("CT_COVID" if patient % 2 else "CT_NonCOVID")
        folder.mkdir(exist_ok=True)
        hu = phantom_slice(np.random.default_rng(patient), 64, 1.0, False, Anatomy.draw(rng))
        cv2.imwrite(str(folder / f"P{patient:04d}_s012.png"), np.round(hu_to_gray(hu, DEFAULT_WINDOW)).astype(np.uint8))
    report = audit(DataOptions(root=str(tmp_path), test_fraction=0.0, val_fraction=0.0), image_size=64)
    assert report["near_duplicates"] == []
    np.testing.assert_array_equal(phantom_slice(np.random.default_rng(1), 64, 1.0, True),
                                  phantom_slice(np.random.default_rng(1), 64, 1.0, True, Anatomy()))



def test_a_drawn_patients_outlines_change_from_slice_to_slice():
    """With one outline on every slice of a patient, the study demo's model learned to
    recognise its training patients instead of the opacities (held-out patients at
    chance); a drawn patient's body outline now changes along the series, the
    default anatomy's does not."""
    from dataclasses import replace

    from ctedge.core.phantom_studies import Anatomy, phantom_slice

    def outlines(anatomy: Anatomy) -> set[bytes]:
        rng = np.random.default_rng(3)
        return {(phantom_slice(rng, 64, 1.0, False, replace(anatomy, noise=0.0)) == -1000).tobytes()
                for _ in range(6)}

    drawn = Anatomy.draw(np.random.default_rng(0))
    assert drawn.jitter > 0 and len(outlines(drawn)) > 1
    assert len(outlines(Anatomy())) == 1
