"""Data sets: class folders, splits made before anything else, cached decoding.

A data set is a folder with one subfolder per class (COVID-CT's ``CT_COVID/``
and ``CT_NonCOVID/`` work as they are). Splits come from official split lists
(``--split-dir``) or a stratified, seeded split; augmentation happens later,
in training, on the training part only, so the paper's leak (augmenting before
splitting) cannot happen here.
"""

from __future__ import annotations

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctedge.core.choices import Clean, Split
from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.imageio import DEFAULT_MAX_PIXELS, image_files, read_image
from ctedge.core.preprocess import ANNOTATION_MIN_FRACTION, PreprocessConfig, annotation_fraction, to_model_input
from ctedge.core.progress import ProgressFn, tracked

log = logging.getLogger(__name__)

SPLITS = Split.values()
HASH_THRESHOLD = 12  # near-duplicate candidates (audit): at most this many of 64 pHash bits differ
CLEAN_MODES = Clean.values()
_POSITIVE_HINT = re.compile(r"covid|positive|pos\b|abnormal|disease", re.I)
_NEGATIVE_HINT = re.compile(r"non|neg|normal|healthy", re.I)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = positive class
    class_name: str


@dataclass
class DataSet:
    root: Path
    class_names: list[str]  # [negative, positive]
    samples: list[Sample]

    @property
    def positive(self) -> str:
        return self.class_names[1]


def _pick_positive(names: list[str]) -> str:
    hinted = [n for n in names if _POSITIVE_HINT.search(n) and not _NEGATIVE_HINT.search(n)]
    if len(hinted) == 1:
        return hinted[0]
    raise CtedgeError(f"not given, and the class names {names} do not tell which is positive; "
                      "name its folder", param="positive")


STUDY_SUFFIXES = (".zip", ".nii", ".nii.gz")


def study_entries(folder: Path) -> list[Path]:
    """The studies in a class folder: subfolders, ``.zip`` files and NIfTI volumes
    (one patient's study each; hidden entries skipped)."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith(".")
                  and (p.is_dir() or p.name.lower().endswith(STUDY_SUFFIXES)))


def discover(root: str | Path, positive: str | None = None, studies: bool = False) -> DataSet:
    """Find the two class folders under ``root`` and their image files (or, with
    ``studies``, their studies: one folder, zip or NIfTI volume per patient)."""
    root = Path(root)
    if not root.is_dir():
        raise CtedgeError(f"data folder not found: {root}")
    what = "studies (folders, .zip or NIfTI)" if studies else "images"
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and p.name != "splits")
    files = {f.name: (study_entries if studies else image_files)(f) for f in folders}
    files = {name: found for name, found in files.items() if found or name == positive}
    if len(files) != 2:
        raise CtedgeError(
            f"{root}: expected two class folders with {what}, found "
            f"{len(files)} ({', '.join(files) or 'none'}); each class needs its own subfolder")
    names = sorted(files)
    positive = positive or _pick_positive(names)
    if positive not in files:
        raise CtedgeError(f"{positive!r} is not a class folder of {root} ({names})", param="positive")
    for name, found in files.items():
        if not found:
            raise CtedgeError(f"class folder {root / name} has no {what}")
    negative = next(n for n in names if n != positive)
    samples = [Sample(p, int(name == positive), name) for name in (negative, positive)
               for p in files[name]]
    return DataSet(root=root, class_names=[negative, positive], samples=samples)


def pick_samples(folder: str | Path, count: int, seed: int = 0) -> tuple[list[Sample], bool]:
    """Up to ``count`` files, seeded, for checks and benchmarks: from class
    folders (labelled: True) or from any folder of images (labelled: False)."""
    root = Path(folder)
    try:
        samples, labelled = discover(root).samples, True
    except CtedgeError:
        if not root.is_dir():
            raise
        samples, labelled = [Sample(p, 0, "") for p in image_files(root)], False
    if not samples:
        raise CtedgeError(f"no images found in {root}")
    chosen = np.random.default_rng(seed).choice(len(samples), min(count, len(samples)), replace=False)
    return [samples[i] for i in sorted(chosen)], labelled


def _class_for_list(list_suffix: str, class_names: list[str]) -> str | None:
    wanted = list_suffix.lower()
    matches = [c for c in class_names
               if c.lower() == wanted or c.lower().endswith("_" + wanted)]
    return matches[0] if len(matches) == 1 else None


def split_from_lists(dataset: DataSet, split_dir: str | Path) -> dict[str, list[Sample]]:
    """Use official split lists: ``{train,val,test}_{CLASS}.txt``, one file name a line."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise CtedgeError(f"split folder not found: {split_dir}")
    by_name = {(s.class_name, s.path.name): s for s in dataset.samples}
    parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    used: dict[Path, Path] = {}  # sample -> the list naming it
    missing: list[str] = []
    for list_file in sorted(split_dir.glob("*.txt")):
        part, _, suffix = list_file.stem.partition("_")
        class_name = _class_for_list(suffix, dataset.class_names)
        if part not in parts or class_name is None:
            log.warning("ignoring split list %s (no matching part/class)", list_file)
            continue
        for line in list_file.read_text(encoding="utf-8", errors="replace").splitlines():
            sample = by_name.get((class_name, line.strip()))
            if sample is None:
                if line.strip():
                    missing.append(line.strip())
                continue
            if sample.path in used:
                where = (f"listed twice in {list_file}" if used[sample.path] == list_file
                         else f"listed in more than one split ({used[sample.path]} and {list_file})")
                raise CtedgeError(f"{sample.path.name} is {where}")
            used[sample.path] = list_file
            parts[part].append(sample)
    if not parts["train"]:
        raise CtedgeError(f"{split_dir}: no split list names a training image of {dataset.root}")
    if missing:
        log.warning("%d file(s) named in %s are not in %s: %s%s", len(missing), split_dir, dataset.root,
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
    unlisted = len(dataset.samples) - len(used)
    if unlisted:
        log.warning("%d image(s) in %s are in no split list and are left out", unlisted, dataset.root)
    return parts


def group_of(path: Path, group_regex: str | None) -> str:
    """The group (patient, source figure) of a file: the regex's first group."""
    if not group_regex:
        return path.name
    match = re.search(group_regex, path.name)
    if not match:
        return path.name
    return match.group(1) if match.groups() else match.group(0)


@dataclass
class LoadedSplit:
    """Decoded model inputs of one split, and what was left out and why."""

    x: np.ndarray  # (N, S, S, 3) float32, 0-255
    y: np.ndarray  # (N,) int
    paths: list[Path]
    hashes: list[str]
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    annotated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"images": len(self.y), "positive": int(self.y.sum()),
                "negative": int(len(self.y) - self.y.sum()),
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "annotated": self.annotated, "dropped": self.dropped}


def _decode(sample: Sample, config: PreprocessConfig, digest: str | None, max_pixels: int):
    try:
        decoded = read_image(sample.path, config.window, max_pixels)
    except UnreadableImage as exc:
        return exc
    digest = digest or hashlib.sha256(sample.path.read_bytes()).hexdigest()
    return (to_model_input(decoded.gray, config.image_size),
            annotation_fraction(decoded.colour), digest)


def load_split(samples: list[Sample], config: PreprocessConfig, clean: str = "drop",
               progress: ProgressFn | None = None, task: str = "decoding",
               workers: int = 4, digests: dict[Path, str] | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedSplit:
    """Decode and resize each image once; skip unreadable files with a warning.
    ``progress`` hears how many of the images (``task``) are done; ``digests``: the
    sha256 of files already hashed (path -> hex); ``max_pixels``: the pixel budget
    (a larger image is skipped as unreadable)."""
    if clean not in CLEAN_MODES:
        raise CtedgeError(f"must be one of {', '.join(CLEAN_MODES)}, not {clean!r}", param="clean")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = pool.map(lambda s: _decode(s, config, (digests or {}).get(s.path), max_pixels), samples)
        results = list(tracked(decoded, task, len(samples), progress))
    size = config.image_size
    xs, ys, paths, hashes = [], [], [], []
    loaded = LoadedSplit(np.zeros((0, size, size, 3), np.float32), np.zeros(0, int), [], [])
    for sample, result in zip(samples, results):
        if isinstance(result, UnreadableImage):
            log.warning("skipping unreadable file %s", result)
            loaded.unreadable.append((str(sample.path), result.reason))
            continue
        image, marks, digest = result
        if clean != "off" and marks >= ANNOTATION_MIN_FRACTION:
            loaded.annotated.append(str(sample.path))
            if clean == "drop":
                loaded.dropped.append(str(sample.path))
                continue
        xs.append(image)
        ys.append(sample.label)
        paths.append(sample.path)
        hashes.append(digest)
    if xs:
        loaded.x = np.stack(xs)
        loaded.y = np.asarray(ys, dtype=int)
    loaded.paths, loaded.hashes = paths, hashes
    return loaded


@dataclass(kw_only=True)
class DataOptions:
    """How a data folder becomes splits; stored in run configs for reuse (all but
    ``max_pixels``, the read budget of the machine reading: ``ctedge --max-pixels``)."""

    root: str = ""
    split_dir: str | None = None
    positive: str | None = None
    seed: int = 42
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    group_regex: str | None = None
    clean: str = "drop"
    max_pixels: int = DEFAULT_MAX_PIXELS
