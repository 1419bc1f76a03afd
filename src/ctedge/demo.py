"""`ctedge demo`: a synthetic CT-like data set (``ctedge.phantoms``), a small
training run, an evaluation."""

from __future__ import annotations

import time
from pathlib import Path

from .phantoms import make_dataset


def run_demo(out: str | Path = "demo", epochs: int = 12, per_class: int = 200,
             backbone: str = "b3") -> dict:
    """Phantoms -> train (weights none, 64 px, whole network, lr 1e-3, no augmentation:
    from scratch on 128 images it keeps the model from learning in a few epochs)
    -> evaluate on the held-out test part."""
    from .data import DataOptions
    from .evaluate import evaluate
    from .model import ModelConfig
    from .preprocess import AugmentConfig, PreprocessConfig
    from .train import TrainConfig, train

    started = time.perf_counter()
    out = Path(out)
    data = make_dataset(out / "data", per_class=per_class)
    run_dir = out / "run"
    train(DataOptions(root=str(data)),
          TrainConfig(epochs=epochs, learning_rate=1e-3, patience=epochs),
          ModelConfig(weights="none", backbone=backbone, units=64, freeze_backbone=False),
          PreprocessConfig(image_size=64, augment=AugmentConfig(0.0, 0.0, False, 0.0)),
          run_dir)
    report = evaluate(run_dir / "model.keras", data, split="test", resamples=500)
    accuracy = report["metrics"]["accuracy"]
    chance = max(report["positive"], report["images"] - report["positive"]) / report["images"]
    above = accuracy["ci95"][0] > chance
    verdict = (f"test accuracy {accuracy['value']:.3f} (95% CI {accuracy['ci95'][0]:.3f}-"
               f"{accuracy['ci95'][1]:.3f}) vs chance {chance:.3f}: "
               + ("well above chance" if above else "NOT clearly above chance"))
    return {"data": str(data), "run_dir": str(run_dir), "evaluation": report,
            "verdict": verdict, "above_chance": above, "seconds": time.perf_counter() - started}
