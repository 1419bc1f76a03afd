"""CI check: examples/node/predict.mjs scores images as `ctedge predict` does.

Writes non-square images in every pixel format the readers meet (8-bit gray, RGB,
RGBA, 16-bit gray, a JPEG saved under a .png name, bytes after IEND, and a strip
that both must refuse), runs both on
them with MODEL.onnx and fails when a probability differs by more than 1e-4 or one
side reads a file the other does not. Also runs the model as an export made before
the preprocessing contract was recorded (contract 1). Needs `npm install` done in
examples/node (`npm install --onnxruntime-node-install=skip`).

    python scripts/check_node_example.py MODEL.onnx [IMAGE...]
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def write_images(folder: Path, seed: int = 0) -> list[Path]:
    """Non-square CT-like images, one per format; shapes chosen so rounding matters."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate([(61, 97), (150, 83), (37, 52), (301, 203), (96, 160), (80, 301)]):
        yy, xx = np.mgrid[:h, :w]
        body = ((yy - h / 2) / (h / 2.2)) ** 2 + ((xx - w / 2) / (w / 2.1)) ** 2 < 1
        gray = np.where(body, 140 + 40 * np.sin(xx / 5.0 + i), 5) + rng.normal(0, 12, (h, w))
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        paths.append(folder / f"gray-{h}x{w}.png")
        cv2.imwrite(str(paths[-1]), gray)
        colour = np.dstack([gray, np.roll(gray, 3, axis=1), np.roll(gray, 5, axis=0)])
        paths.append(folder / f"rgb-{h}x{w}.png")
        cv2.imwrite(str(paths[-1]), colour)
    paths.append(folder / "rgba.png")
    cv2.imwrite(str(paths[-1]), np.dstack([colour, np.full(colour.shape[:2], 200, np.uint8)]))
    paths.append(folder / "gray16.png")
    cv2.imwrite(str(paths[-1]), gray.astype(np.uint16) * 257 + rng.integers(0, 257, gray.shape, dtype=np.uint16))
    paths.append(folder / "jpeg-named.png")  # as some COVID-CT "PNGs" are
    paths[-1].write_bytes(cv2.imencode(".jpg", colour)[1].tobytes())
    paths.append(folder / "trailing.png")  # bytes after IEND
    paths[-1].write_bytes(cv2.imencode(".png", gray)[1].tobytes() + b"\0" * 16)
    paths.append(folder / "strip-20x301.png")  # no CT slice: both sides refuse it
    cv2.imwrite(str(paths[-1]), gray[:20])
    return paths


def as_contract_1(model: Path, out: Path) -> Path:
    """The model with the contract removed from its metadata, as older exports are."""
    proto = onnx.load(str(model))
    for entry in proto.metadata_props:
        if entry.key == "ctedge.preprocess":
            entry.value = json.dumps({k: v for k, v in json.loads(entry.value).items() if k != "contract"})
    onnx.save(proto, str(out))
    return out


def python_scores(model: Path, images: list[Path], out: Path) -> dict[str, float | None]:
    subprocess.run(["ctedge", "predict", str(model), *map(str, images), "--csv", str(out)],
                   check=False, capture_output=True)
    with open(out, newline="") as f:
        return {row["path"]: float(row["probability"]) if row["probability"] else None
                for row in csv.DictReader(f)}


def node_scores(model: Path, images: list[Path]) -> dict[str, float | None]:
    done = subprocess.run(["node", "predict.mjs", str(model), *map(str, images)], cwd=ROOT / "examples" / "node",
                          capture_output=True, text=True)
    scores = {}
    for line in done.stdout.splitlines():
        path, value = line.split("\t", 1)
        scores[path] = None if value.startswith("error") else float(value)
    return scores


def compare(model: Path, images: list[Path], work: Path) -> list[str]:
    """Problems of one model; prints the largest difference."""
    ours, theirs = python_scores(model, images, work / f"{model.stem}.csv"), node_scores(model, images)
    problems = [f"{path}: ctedge predict {ours.get(path)}, node {theirs.get(path)}"
                for path in map(str, images) if (ours.get(path) is None) != (theirs.get(path) is None)]
    both = [path for path in map(str, images) if ours.get(path) is not None and theirs.get(path) is not None]
    worst = max(both, key=lambda p: abs(ours[p] - theirs[p]), default=None)
    if worst is None:
        return [*problems, f"{model}: no image scored by both"]
    gap = abs(ours[worst] - theirs[worst])
    print(f"{model.name}: {len(both)} images, max |Δp| {gap:.2e} ({worst})")
    if gap > TOLERANCE:
        problems.append(f"{worst}: ctedge predict {ours[worst]:.6f}, node {theirs[worst]:.6f}")
    return problems


def main(model: Path, extra: list[Path]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = write_images(work / "images") + extra
        problems = compare(model, images, work) + compare(as_contract_1(model, work / "contract1.onnx"), images, work)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]))
