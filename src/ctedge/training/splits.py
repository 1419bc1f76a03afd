"""Splits made before anything else: the official lists, or a stratified, seeded,
group-aware split (scikit-learn), then the decoded parts a run trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ctedge.core.data import (
    SPLITS,
    DataOptions,
    DataSet,
    LoadedSplit,
    Sample,
    discover,
    group_of,
    load_split,
    split_from_lists,
)
from ctedge.core.errors import CtedgeError
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.progress import ProgressFn


def random_split(dataset: DataSet, seed: int = 42, test_fraction: float = 0.2,
                 val_fraction: float = 0.2, group_regex: str | None = None
                 ) -> dict[str, list[Sample]]:
    """Stratified, seeded train/val/test split; group-aware when a regex is given."""
    def cut(samples: list[Sample], fraction: float, salt: int) -> tuple[list, list]:
        if fraction <= 0:
            return samples, []
        labels = [s.label for s in samples]
        groups = [group_of(s.path, group_regex) for s in samples]
        folds = max(2, round(1 / fraction))
        if min(np.bincount(labels, minlength=2)) < folds:
            raise CtedgeError(f"too few images per class ({np.bincount(labels)}) to split "
                              f"off {fraction:.0%}; add images or pass --split-dir")
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + salt)
        keep, held = next(splitter.split(np.zeros(len(samples)), labels, groups))
        return [samples[i] for i in keep], [samples[i] for i in held]

    rest, test = cut(list(dataset.samples), test_fraction, 0)
    train, val = cut(rest, val_fraction, 1)
    return {"train": train, "val": val, "test": test}


def make_splits(dataset: DataSet, split_dir: str | Path | None = None, seed: int = 42,
                test_fraction: float = 0.2, val_fraction: float = 0.2,
                group_regex: str | None = None) -> dict[str, list[Sample]]:
    """Official lists when ``split_dir`` is given, else a stratified seeded split."""
    if split_dir:
        return split_from_lists(dataset, split_dir)
    return random_split(dataset, seed, test_fraction, val_fraction, group_regex)



def load_data(options: DataOptions, config: PreprocessConfig, parts: tuple[str, ...] = SPLITS,
              progress: ProgressFn | None = None, digests: dict[Path, str] | None = None
              ) -> tuple[DataSet, dict[str, LoadedSplit]]:
    """Discover, split, then decode the requested parts (each image once; files whose
    sha256 is in ``digests`` are not hashed again)."""
    dataset = discover(options.root, options.positive)
    splits = make_splits(dataset, options.split_dir, options.seed, options.test_fraction,
                         options.val_fraction, options.group_regex)
    loaded = {}
    for part in parts:
        loaded[part] = load_split(splits[part], config, options.clean, progress, f"decoding {part}",
                                  digests=digests, max_pixels=options.max_pixels)
        if splits[part] and not len(loaded[part].y):
            raise CtedgeError(f"no readable images left in the {part} split of {options.root}")
    return dataset, loaded
