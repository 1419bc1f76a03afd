"""`ctedge explain`: Grad-CAM heatmaps for the positive class.

Grad-CAM (Selvaraju et al., 2017): the gradient of the positive-class logit
with respect to the backbone's last feature map, averaged over space, weighs
that map's channels; the ReLU of the weighted sum, upsampled, shows where
the evidence for "positive" lies. The heatmap is mapped back through the
letterbox, so it has the original image's size and lies over it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ctedge.core.errors import CtedgeError, UnreadableImage
from ctedge.core.files import atomic_write
from ctedge.core.imageio import DEFAULT_MAX_PIXELS, read_image
from ctedge.core.metrics import DEFAULT_THRESHOLD
from ctedge.core.preprocess import to_model_input
from ctedge.core.progress import ProgressFn, tracked

MIN_SHOWN = 384  # pixels: smaller images are enlarged in the overlay PNG


@dataclass
class Explanation:
    """One explained image; ``error`` is set instead when it could not be read."""

    path: str
    probability: float | None = None
    overlay: str | None = None
    peak_xy: tuple[int, int] | None = None  # hottest pixel, original image coordinates
    error: str | None = None
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"path": self.path, "probability": self.probability, "overlay": self.overlay,
                "peak_xy": list(self.peak_xy) if self.peak_xy else None, "error": self.error}


def _feature_index(model) -> int:
    """Index in ``model.layers`` of the feature map Grad-CAM looks at: the
    nested backbone, else the last layer with a 4-D (N, H, W, C) output."""
    import keras

    for i, layer in enumerate(model.layers):
        if isinstance(layer, keras.Model):
            return i
    spatial = [i for i, layer in enumerate(model.layers) if len(layer.output.shape) == 4]
    if not spatial:
        raise CtedgeError(f"{model.name}: no convolutional feature map to explain")
    return spatial[-1]


def grad_cam(model, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N,) and Grad-CAM maps (N, h, w) in [0, 1] at the feature
    map's resolution, for a chain model whose last layer is a sigmoid Dense."""
    import tensorflow as tf
    from keras import ops

    split = _feature_index(model)
    layers = model.layers[1:]  # layers[0] is the InputLayer
    head = layers[split:]
    output = head[-1]
    images = tf.convert_to_tensor(batch, tf.float32)
    with tf.GradientTape() as tape:
        x = images
        for layer in layers[:split]:
            x = layer(x, training=False)
        features = x
        tape.watch(features)
        for layer in head[:-1]:
            x = layer(x, training=False)
        logit = ops.matmul(x, output.kernel) + output.bias  # before the sigmoid: no saturation
    grads = tape.gradient(logit, features).numpy()
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * features.numpy()).sum(axis=-1), 0.0)
    peaks = cams.max(axis=(1, 2), keepdims=True)
    cams = np.divide(cams, peaks, out=np.zeros_like(cams), where=peaks > 0)
    return 1.0 / (1.0 + np.exp(-logit.numpy()[:, 0])), cams


def to_image_size(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo the letterbox: a map over the padded square -> (height, width)."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = cv2.resize(cam.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    return np.clip(square[top:top + height, left:left + width], 0.0, 1.0)


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with a dark banner of text above it."""
    width = image.shape[1]
    (text_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    scale = min(1.2, width / 700, (width - 10) / text_w)  # large enough to read, never cut off
    (_, text_h), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    banner = np.full((text_h + baseline + 10, width, 3), 24, np.uint8)
    cv2.putText(banner, text, (5, text_h + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)
    return np.vstack([banner, image])


def overlay(base_bgr: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Jet-coloured heatmap over the image, opaque where the heat is high."""
    colours = cv2.applyColorMap((heatmap * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    weight = (alpha * heatmap)[:, :, None]
    return (base_bgr.astype(np.float32) * (1 - weight) + colours * weight).astype(np.uint8)


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` scaled so that its longer side is ``side`` pixels."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def contact_sheet(items: list[tuple[np.ndarray, str]], columns: int = 4, tile: int = 256) -> np.ndarray:
    """Grid of captioned thumbnails (BGR); each caption is cut to 36 characters."""
    tiles = []
    for image, text in items:
        small = fit(image, tile)
        square = np.zeros((tile, tile, 3), np.uint8)
        top, left = (tile - small.shape[0]) // 2, (tile - small.shape[1]) // 2
        square[top:top + small.shape[0], left:left + small.shape[1]] = small
        tiles.append(_caption(square, text[:36]))
    columns = max(1, min(columns, len(tiles)))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    return np.vstack(rows)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise CtedgeError(f"could not encode {path}")
    atomic_write(data.tobytes(), path)


def _unique_name(path: Path, taken: set[str]) -> str:
    name, n = f"{path.stem}.gradcam.png", 1
    while name in taken:
        n += 1
        name = f"{path.stem}-{n}.gradcam.png"
    taken.add(name)
    return name


def check(model_path: str | Path, alpha: float) -> None:
    """Refuse what ``explain`` cannot do, before any file is read."""
    if Path(model_path).suffix != ".keras":
        raise CtedgeError(f"{model_path}: explain needs the trained .keras model (an ONNX file has no gradients)")
    if not 0.0 <= alpha <= 1.0:
        raise CtedgeError(f"must be between 0 and 1, not {alpha}", param="alpha")


def explain(model_path: str | Path, files: list[Path], out_dir: str | Path,
            threshold: float = DEFAULT_THRESHOLD, positive: str = "positive", alpha: float = 0.5,
            batch_size: int = 8, sheet: bool = True, keep_heatmaps: bool = False,
            sheet_limit: int = 48, progress: ProgressFn | None = None,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Grad-CAM overlays (``NAME.gradcam.png``) for ``files``; a contact sheet of
    the first ``sheet_limit`` when there are several. Files are read a batch at a
    time; unreadable ones (or above ``max_pixels``) get an error entry. The image-sized heatmaps are kept on
    the entries only when asked. ``progress`` hears the batches done."""
    check(model_path, alpha)
    from ctedge.core.runconfig import keras_preprocess_config
    from ctedge.training.model import load_model

    model = load_model(model_path)
    size = int(model.input_shape[1])
    preprocess = keras_preprocess_config(model)
    window = (preprocess.window_low, preprocess.window_high)  # DICOM decoded as the runtime does
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[Explanation | None] = []
    taken: set[str] = set()
    sheet_items = []
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
    for chunk in tracked(chunks, "Grad-CAM", len(chunks), progress):
        batch = []
        for path in chunk:
            try:
                batch.append((len(results), path, read_image(path, window, max_pixels)))
                results.append(None)  # filled below
            except UnreadableImage as exc:
                results.append(Explanation(str(path), error=exc.reason))
        if not batch:
            continue
        x = np.stack([to_model_input(image.gray, size) for _, _, image in batch])
        probabilities, cams = grad_cam(model, x)
        for (index, path, image), p, cam in zip(batch, probabilities, cams):
            h, w = image.gray.shape
            heat = to_image_size(cam, h, w)
            base = image.colour if image.colour is not None else cv2.cvtColor(
                np.clip(image.gray, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            label = positive if p >= threshold else f"not {positive}"
            shown = overlay(base, heat, alpha)
            if max(h, w) < MIN_SHOWN:  # small images: enlarged so the caption can be read
                shown = cv2.resize(shown, None, fx=MIN_SHOWN / max(h, w), fy=MIN_SHOWN / max(h, w),
                                   interpolation=cv2.INTER_NEAREST)
            target = out / _unique_name(path, taken)
            _write_png(target, _caption(shown, f"P({positive}) {p:.3f}: {label}"))
            y_peak, x_peak = np.unravel_index(int(heat.argmax()), heat.shape)
            results[index] = Explanation(str(path), float(p), str(target), (int(x_peak), int(y_peak)),
                                         heatmap=heat if keep_heatmaps else None)
            if len(sheet_items) < sheet_limit:
                sheet_items.append((fit(shown, 256), f"{p:.2f} {path.name}"))
    report = {"model": str(model_path), "positive": positive, "threshold": threshold,
              "explanations": results, "contact_sheet": None}
    if sheet and len(sheet_items) > 1:
        target = out / "contact_sheet.png"
        _write_png(target, contact_sheet(sheet_items))
        report["contact_sheet"] = str(target)
    return report
