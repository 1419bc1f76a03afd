"""Keras Tuner the naive way (backbone recomputed every epoch) vs ctedge's cached
backbone features: trials per hour, best val AUC, memory per trial.

    python benchmarks/tune_speed.py --data ../shared/data/covid-ct \
        --split-dir ../shared/data/covid-ct/splits --backbone-from runs/b3-128/model.keras

Both searches use the same data, frozen backbone, search space, seed, trial
count and epochs. ``--backbone-from`` takes the backbone of a trained model as
the weights file (random filters would make every AUC 0.5 and the comparison
of scores empty); ``--weights`` takes an efficientnetb3_notop.h5 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ctedge.bench import machine_info  # noqa: E402
from ctedge.data import DataOptions  # noqa: E402
from ctedge.model import ModelConfig  # noqa: E402
from ctedge.preprocess import PreprocessConfig  # noqa: E402
from ctedge.tuning import TuneOptions, tune  # noqa: E402


def backbone_file(model_path: str, folder: Path) -> Path:
    """A trained classifier's backbone as a Keras-format weights file."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from ctedge.model import load_model

    path = folder / "efficientnetb3_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, load_model(model_path).get_layer("efficientnetb3"))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-dir")
    parser.add_argument("--backbone-from")
    parser.add_argument("--weights")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    report = {"machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M"),
              "settings": vars(args), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or (str(backbone_file(args.backbone_from, Path(tmp))) if args.backbone_from else "none")
        for mode, cache in (("cached", True), ("naive", False)):
            started = time.perf_counter()
            summary = tune(DataOptions(root=args.data, split_dir=args.split_dir),
                           ModelConfig(weights=weights, freeze_backbone=True),
                           PreprocessConfig(image_size=args.image_size),
                           TuneOptions(max_trials=args.trials, epochs=args.epochs, views=args.views,
                                       directory=tmp, project=mode, cache=cache, patience=args.epochs))
            seconds = time.perf_counter() - started
            report["modes"][mode] = {
                "wall_seconds": seconds, "trials": len(summary["trials"]),
                "trials_per_hour": len(summary["trials"]) / seconds * 3600,
                "seconds_per_trial": float(np.mean([t["seconds"] for t in summary["trials"]])),
                "best_val_auc": summary["best_score"],
                "rss_mb_after_each_trial": [t["rss_mb"] for t in sorted(summary["trials"], key=lambda t: t["trial"])],
            }
            print(mode, json.dumps(report["modes"][mode]), flush=True)
    cached, naive = report["modes"]["cached"], report["modes"]["naive"]
    report["speedup"] = cached["trials_per_hour"] / naive["trials_per_hour"]
    report["speedup_per_trial"] = naive["seconds_per_trial"] / cached["seconds_per_trial"]
    report["auc_difference"] = cached["best_val_auc"] - naive["best_val_auc"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_speed.json").write_text(json.dumps(report, indent=2))
    m = report["machine"]
    lines = [f"# Tuning speed: cached features vs naive Keras Tuner ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}. Data: {args.data} "
             f"(official train/val split), {args.image_size} px, {args.trials} trials x {args.epochs} epochs, "
             f"frozen backbone ({'from ' + args.backbone_from if args.backbone_from else weights}), "
             f"{args.views} augmented views per image in the cache.", "",
             "| mode | wall s (setup included) | trials/hour | s per trial | best val AUC | RSS after each trial (MB) |",
             "|---|---|---|---|---|---|"]
    for mode, r in report["modes"].items():
        lines.append(f"| {mode} | {r['wall_seconds']:.0f} | {r['trials_per_hour']:.0f} | "
                     f"{r['seconds_per_trial']:.1f} | {r['best_val_auc']:.4f} | "
                     + ", ".join(f"{v:.0f}" for v in r["rss_mb_after_each_trial"]) + " |")
    lines += ["", f"Speed-up: **{report['speedup']:.1f}x** in trials/hour with the one-time feature "
              f"extraction counted, **{report['speedup_per_trial']:.1f}x** per trial; best val AUC cached - naive: "
              f"{report['auc_difference']:+.4f}."]
    (out / "tune_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
