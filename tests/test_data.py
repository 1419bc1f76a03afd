import shutil

import cv2
import numpy as np
import pytest

from ctedge.core.data import DataOptions, discover, load_split, split_from_lists
from ctedge.core.errors import CtedgeError
from ctedge.core.files import file_digest
from ctedge.core.preprocess import PreprocessConfig
from ctedge.training.splits import load_data, make_splits, random_split


def test_covid_ct_layout_detects_the_positive_class(phantom_data):
    dataset = discover(phantom_data)
    assert dataset.class_names == ["CT_NonCOVID", "CT_COVID"]
    assert sum(s.label for s in dataset.samples) == 12


def test_positive_can_be_given_and_unknown_names_are_refused(phantom_data):
    assert discover(phantom_data, positive="CT_NonCOVID").positive == "CT_NonCOVID"
    with pytest.raises(CtedgeError, match="^positive 'nope' is not a class folder") as refused:
        discover(phantom_data, positive="nope")
    assert refused.value.param == "positive"  # the CLI shows it as --positive


def test_one_class_or_missing_folder_is_a_clear_error(tmp_path, phantom_data):
    shutil.copytree(phantom_data / "CT_COVID", tmp_path / "only" / "CT_COVID")
    with pytest.raises(CtedgeError, match="two class folders"):
        discover(tmp_path / "only")
    with pytest.raises(CtedgeError, match="not found"):
        discover(tmp_path / "missing")


def test_ambiguous_class_names_ask_for_positive(tmp_path, phantom_data):
    for name in ("cats", "dogs"):
        shutil.copytree(phantom_data / "CT_COVID", tmp_path / name)
    with pytest.raises(CtedgeError, match="^positive not given") as refused:
        discover(tmp_path)
    assert refused.value.param == "positive"


def test_random_split_is_disjoint_stratified_and_seeded(phantom_data):
    dataset = discover(phantom_data)
    parts = random_split(dataset, seed=3)
    names = [set(s.path for s in parts[p]) for p in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == len(dataset.samples)
    for part in parts.values():
        assert {s.label for s in part} == {0, 1}
    assert random_split(dataset, seed=3) == parts
    assert random_split(dataset, seed=4) != parts


def test_group_aware_split_keeps_groups_together(tmp_path):
    from ctedge.core.phantoms import phantom
    rng = np.random.default_rng(0)
    for cls, label in (("CT_COVID", True), ("CT_NonCOVID", False)):
        (tmp_path / cls).mkdir()
        for group in range(10):
            for k in range(3):
                cv2.imwrite(str(tmp_path / cls / f"{cls}{group}-p{k}.png"), phantom(rng, 32, label))
    parts = random_split(discover(tmp_path), seed=0, group_regex=r"^(.*)-p\d")
    groups = {p: {s.path.name.split("-p")[0] for s in parts[p]} for p in parts}
    assert all(groups[p] for p in ("train", "val", "test")), "a part with no group makes the check empty"
    assert not (groups["train"] & groups["test"] or groups["train"] & groups["val"]
                or groups["val"] & groups["test"])


def test_official_split_lists_are_used(tmp_path, phantom_data):
    dataset = discover(phantom_data)
    covid = sorted(s.path.name for s in dataset.samples if s.label)
    non = sorted(s.path.name for s in dataset.samples if not s.label)
    (tmp_path / "train_COVID.txt").write_text("\n".join(covid[:8]))
    (tmp_path / "val_COVID.txt").write_text("\n".join(covid[8:]) + "\nnot_there.png\n")
    (tmp_path / "train_NonCOVID.txt").write_text("\n".join(non[:9]))
    (tmp_path / "val_NonCOVID.txt").write_text("\n".join(non[9:]))
    parts = split_from_lists(dataset, tmp_path)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [17, 7, 0]
    assert make_splits(dataset, tmp_path) == parts


def test_a_file_listed_in_two_splits_is_refused(tmp_path, phantom_data):
    name = discover(phantom_data).samples[-1].path.name
    (tmp_path / "train_COVID.txt").write_text(name)
    (tmp_path / "val_COVID.txt").write_text(name)
    with pytest.raises(CtedgeError, match="more than one split"):
        split_from_lists(discover(phantom_data), tmp_path)


def test_a_file_listed_twice_in_one_list_names_that_list(tmp_path, phantom_data):
    name = discover(phantom_data).samples[-1].path.name
    (tmp_path / "train_COVID.txt").write_text(f"{name}\n{name}\n")
    with pytest.raises(CtedgeError, match=f"{name} is listed twice in {tmp_path / 'train_COVID.txt'}"):
        split_from_lists(discover(phantom_data), tmp_path)


def test_files_missing_from_the_data_are_named(tmp_path, phantom_data, caplog):
    names = [s.path.name for s in discover(phantom_data).samples if s.label]
    (tmp_path / "train_COVID.txt").write_text("\n".join(names + [f"gone{i}.png" for i in range(7)]))
    split_from_lists(discover(phantom_data), tmp_path)
    assert f"7 file(s) named in {tmp_path} are not in {phantom_data}: gone0.png, gone1.png, gone2.png, " \
           "gone3.png, gone4.png, ..." in caplog.text


def test_unreadable_files_are_named_skipped_and_counted(tmp_path, phantom_data):
    data = tmp_path / "data"
    shutil.copytree(phantom_data, data)
    (data / "CT_COVID" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (data / "CT_NonCOVID" / "notes.png").write_text("a text file named .png")
    dataset = discover(data)
    loaded = load_split(dataset.samples, PreprocessConfig(image_size=32))
    assert len(loaded.y) == 24
    assert sorted(p.split("/")[-1] for p, _ in loaded.unreadable) == ["corrupt.png", "notes.png"]
    assert loaded.x.shape == (24, 32, 32, 3)


def test_decoding_reports_progress_and_reuses_known_digests(phantom_data):
    samples = discover(phantom_data).samples
    events = []
    known = {samples[0].path: "f" * 64}
    loaded = load_split(samples, PreprocessConfig(image_size=32), progress=events.append, task="decoding train",
                        digests=known)
    assert [(e.task, e.done, e.total) for e in events] == [("decoding train", n, len(samples))
                                                            for n in range(len(samples) + 1)]
    assert loaded.hashes[loaded.paths.index(samples[0].path)] == "f" * 64
    assert loaded.hashes[1] == file_digest(loaded.paths[1])


def test_annotated_images_are_dropped_or_reported(tmp_path, phantom_data):
    data = tmp_path / "data"
    shutil.copytree(phantom_data, data)
    marked = data / "CT_COVID" / "phantom_000.png"
    image = cv2.cvtColor(cv2.imread(str(marked), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)
    cv2.rectangle(image, (10, 10), (50, 50), (0, 0, 255), 2)
    cv2.imwrite(str(marked), image)
    samples = discover(data).samples
    config = PreprocessConfig(image_size=32)
    dropped = load_split(samples, config, clean="drop")
    assert dropped.dropped == [str(marked)] and len(dropped.y) == 23
    reported = load_split(samples, config, clean="report")
    assert reported.annotated == [str(marked)] and len(reported.y) == 24
    assert load_split(samples, config, clean="off").annotated == []


def test_load_data_decodes_each_part(phantom_data):
    _, parts = load_data(DataOptions(root=str(phantom_data)), PreprocessConfig(image_size=32),
                         parts=("train", "val"))
    assert set(parts) == {"train", "val"}
    assert len(parts["train"].y) > len(parts["val"].y) > 0
