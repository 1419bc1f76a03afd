"""Build EfficientNetB3 at 300 px with random weights (``weights="none"``) and
export it to ONNX: a model for *timing* only (its outputs mean nothing).

    python benchmarks/make_b3.py runs/bench-b3   # -> runs/bench-b3/b3_300.onnx

Needs the train extra (TensorFlow); the output folder should be git-ignored.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_b3(folder: Path, size: int = 300) -> Path:
    output = folder / f"b3_{size}.onnx"
    if output.is_file():
        return output  # without importing TensorFlow (timings run in this process)
    from ctedge.core.preprocess import PreprocessConfig
    from ctedge.training.export import ExportOptions, export_onnx
    from ctedge.training.model import ModelConfig, build_model

    folder.mkdir(parents=True, exist_ok=True)
    keras_path = folder / f"b3_{size}.keras"
    build_model(ModelConfig(weights="none"), PreprocessConfig(image_size=size)).save(keras_path)
    # random BatchNorm statistics make Keras/ONNX parity loose, and random weights give a nearly
    # constant output (the export refuses that unless told); timing does not care
    export_onnx(keras_path, output, ExportOptions(check_count=4, tolerance=1.0, allow_constant=True))
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, nargs="?", default=Path("runs/bench-b3"),
                        help="Where b3_300.onnx goes (git-ignored) [runs/bench-b3].")
    print(make_b3(parser.parse_args().folder))
