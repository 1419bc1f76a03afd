"""Synthetic CT-like phantoms: a body ellipse with two dark lung fields; the
positive class adds ground-glass-like opacities (hazy brighter patches) inside
the lungs. Deterministic by seed. Used by `ctedge demo`, by `export` and `bench`
when no real images are given, and by the tests to make their own images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ctedge.core.imageio import DEFAULT_WINDOW, hu_to_gray

WINDOW = DEFAULT_WINDOW


def phantom(rng: np.random.Generator, size: int = 96, positive: bool = False) -> np.ndarray:
    """One uint8 gray CT-like slice (HU drawn, then windowed to 0-255)."""
    hu = np.full((size, size), -1000.0, np.float32)  # air
    c = size / 2
    jitter = lambda s: rng.uniform(1 - s, 1 + s)  # noqa: E731
    cv2.ellipse(hu, (int(c), int(c)), (int(0.45 * size * jitter(0.05)), int(0.35 * size * jitter(0.05))),
                0, 0, 360, 40.0, -1)  # soft tissue
    lungs = np.zeros((size, size), np.uint8)
    for side in (-1, 1):
        centre = (int(c + side * 0.2 * size * jitter(0.1)), int(c * jitter(0.05)))
        axes = (int(0.14 * size * jitter(0.1)), int(0.25 * size * jitter(0.1)))
        cv2.ellipse(lungs, centre, axes, rng.uniform(-10, 10), 0, 360, 1, -1)
    hu[lungs > 0] = -850.0
    for _ in range(rng.integers(4, 9)):  # vessels
        y, x = np.argwhere(lungs)[rng.integers(lungs.sum())]
        cv2.circle(hu, (int(x), int(y)), max(1, size // 64), 30.0, -1)
    if positive:
        opacity = np.zeros((size, size), np.float32)
        for _ in range(rng.integers(3, 7)):
            y, x = np.argwhere(lungs)[rng.integers(lungs.sum())]
            cv2.circle(opacity, (int(x), int(y)), int(size * rng.uniform(0.06, 0.12)), 1.0, -1)
        opacity = cv2.GaussianBlur(opacity, (0, 0), size / 40) * (lungs > 0)
        hu += opacity * 500.0  # -850 -> about -350 HU: ground glass
    hu += rng.normal(0, 25, hu.shape).astype(np.float32)
    return np.round(hu_to_gray(hu, WINDOW)).astype(np.uint8)


def make_dataset(root: str | Path, per_class: int = 60, size: int = 96, seed: int = 0,
                 positive: str = "CT_COVID", negative: str = "CT_NonCOVID") -> Path:
    """Write ``per_class`` PNG phantoms into ``root/positive`` and ``root/negative``.

    Stored without compression, so every file of one size has the same number of
    bytes: compressed, the opacities made positive files larger and file size
    alone gave the class away (the shortcut ``ctedge audit`` looks for)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, label in ((negative, False), (positive, True)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cv2.imwrite(str(root / name / f"phantom_{i:03d}.png"), phantom(rng, size, label),
                        [cv2.IMWRITE_PNG_COMPRESSION, 0])
    return root
