"""Shared fixtures: every test makes its own small images (no ../shared, no network)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ctedge.demo import make_dataset  # noqa: E402


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    """A COVID-CT-like folder: CT_COVID/ and CT_NonCOVID/, 12 phantoms each, 64 px."""
    return make_dataset(tmp_path_factory.mktemp("phantoms"), per_class=12, size=64, seed=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantom_data) -> Path:
    """A tiny trained run (48 px, 2 epochs of batch 4) shared by evaluate/export tests;
    its outputs differ between images, so parity checks on it can fail."""
    from ctedge.data import DataOptions
    from ctedge.model import ModelConfig
    from ctedge.preprocess import PreprocessConfig
    from ctedge.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("run")
    train(DataOptions(root=str(phantom_data), seed=0),
          TrainConfig(epochs=2, batch_size=4, learning_rate=1e-3),
          ModelConfig(weights="none", units=8, freeze_backbone=False),
          PreprocessConfig(image_size=48), run_dir)
    return run_dir
