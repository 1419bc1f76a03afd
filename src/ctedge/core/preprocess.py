"""The paper's preprocessing, defined once.

Two halves, both TensorFlow-free so the runtime can share them:

* host side (numpy/opencv): gray image -> letterboxed square of the model's
  size, 3 channels, 0-255; annotation-mark detection; training augmentation.
* graph side: ``model_pixels`` maps those 0-255 pixels through Hounsfield
  units, the [-1000, 400] window and the 0.25 zero-centre, then back to the
  0-255 RGB range that Keras's EfficientNet expects. ``ctedge.training.model`` runs it
  inside the Keras graph (with ``keras.ops``), so training, the exported ONNX
  file and the runtime cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import cv2
import numpy as np

from ctedge.core.imageio import DEFAULT_WINDOW

ANNOTATION_MIN_FRACTION = 0.001  # coloured pixels from which an image counts as annotated


@dataclass(kw_only=True)
class AugmentConfig:
    """Training-only augmentation (the paper's rotation, shift, flip, padding)."""

    rotation_deg: float = 15.0
    shift: float = 0.1
    horizontal_flip: bool = True
    zoom: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.rotation_deg or self.shift or self.horizontal_flip or self.zoom)


@dataclass(kw_only=True)
class PreprocessConfig:
    """Every preprocessing parameter; stored in run configs and ONNX metadata."""

    image_size: int = 300
    window_low: float = DEFAULT_WINDOW[0]
    window_high: float = DEFAULT_WINDOW[1]
    centre: float = 0.25
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def window(self) -> tuple[float, float]:
        return (self.window_low, self.window_high)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        data = dict(data)
        augment = AugmentConfig(**data.pop("augment", {}))
        return cls(augment=augment, **data)


# --- graph side -----------------------------------------------------------

def gray_to_hu(gray, window: tuple[float, float]):
    """8-bit gray level -> HU: 0 is the window's low end, 255 its high end."""
    low, high = window
    return low + gray * ((high - low) / 255.0)


def zero_centred(hu, window: tuple[float, float], centre: float, clip: Callable = np.clip):
    """The paper's normalisation: window -> [0, 1], then subtract ``centre``."""
    low, high = window
    return clip((hu - low) / (high - low), 0.0, 1.0) - centre


def model_pixels(pixels, config: PreprocessConfig, clip: Callable = np.clip):
    """Raw 0-255 model input -> what the EfficientNet backbone is fed.

    gray -> HU -> window [0, 1] -> zero-centred [-c, 1-c] -> (z + c) * 255.
    The backbone normalises 0-255 RGB itself (ImageNet mean/std), so the
    zero-centred values are shifted back into its range rather than fed raw.
    Works on numpy arrays and, with ``clip=keras.ops.clip``, on tensors.
    """
    hu = gray_to_hu(pixels, config.window)
    z = zero_centred(hu, config.window, config.centre, clip)
    return (z + config.centre) * 255.0


# --- host side ------------------------------------------------------------

# Host preprocessing contract, stored in the ONNX metadata as ctedge.core.preprocess.contract:
# 1 (models exported before it was numbered): pad to a square, then resize;
# 2: resize the longest side, then pad, so a large image never becomes a float32
# square of its own size. The runtime gives each model the contract it was checked with.
PREPROCESS_CONTRACT = 2


def letterbox(gray: np.ndarray, size: int, contract: int = PREPROCESS_CONTRACT) -> np.ndarray:
    """Resize the longest side to ``size`` keeping the aspect ratio, then pad to a
    square with black (air), centred (contract 2; ``contract=1``: the older order)."""
    if contract == 1:
        return _pad_then_resize(gray, size)
    h, w = gray.shape[:2]
    scale = size / max(h, w)
    new_h, new_w = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(gray, (new_w, new_h), interpolation=interpolation)
    if (new_h, new_w) == (size, size) and resized.dtype == np.float32:
        return resized  # a square image fills the square: nothing to pad
    top, left = (size - new_h) // 2, (size - new_w) // 2
    square = np.zeros((size, size), dtype=np.float32)
    square[top:top + new_h, left:left + new_w] = resized
    return square


def _pad_then_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Contract 1, for models exported under it: the two orders differ by up to a
    pixel's shift at the image's edges, which moved a weakly trained model's
    probabilities by up to 0.33 (measured on COVID-CT), so it is kept, not approximated."""
    h, w = gray.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top:top + h, left:left + w] = gray
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interpolation)


def to_model_input(gray: np.ndarray, size: int, contract: int = PREPROCESS_CONTRACT) -> np.ndarray:
    """Gray image of any size -> float32 (size, size, 3), 0-255."""
    square = letterbox(gray.astype(np.float32, copy=False), size, contract)
    return cv2.merge([square, square, square])  # the gray in 3 channels (np.repeat took 9x as long)


def annotation_fraction(colour: np.ndarray | None, min_saturation: int = 100,
                        min_value: int = 60) -> float:
    """Fraction of strongly saturated pixels: CT is gray, marks are coloured."""
    if colour is None:
        return 0.0
    hsv = cv2.cvtColor(colour, cv2.COLOR_BGR2HSV)
    saturated = (hsv[:, :, 1] >= min_saturation) & (hsv[:, :, 2] >= min_value)
    return float(saturated.mean())


def has_annotation(colour: np.ndarray | None, min_fraction: float = ANNOTATION_MIN_FRACTION) -> bool:
    """True when coloured marks (boxes, arrows) cover at least ``min_fraction``."""
    return annotation_fraction(colour) >= min_fraction


def augment(image: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """One random rotation/shift/zoom/flip of an (H, W, C) model input."""
    h, w = image.shape[:2]
    angle = rng.uniform(-config.rotation_deg, config.rotation_deg)
    scale = rng.uniform(1.0 - config.zoom, 1.0 + config.zoom)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    matrix[0, 2] += rng.uniform(-config.shift, config.shift) * w
    matrix[1, 2] += rng.uniform(-config.shift, config.shift) * h
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if out.ndim == 2:
        out = out[:, :, None]
    if config.horizontal_flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
