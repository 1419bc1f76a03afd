"""Keras Tuner the naive way (backbone recomputed every epoch, each trial in its
own process) vs ctedge's cached backbone features, at the paper's 300 px.

    python benchmarks/tune_speed.py --data ../shared/data/covid-ct \
        --split-dir ../shared/data/covid-ct/splits --weights runs/b3-128/model.keras

Two parts, in one run:

1. **Agreement** (both searches measured whole): the same ``--trials`` trials (random
   search, one seed, so the same hyperparameters in the same order), ``--epochs``
   each, on the same frozen backbone: trials/hour with the one-time feature
   extraction counted, best val AUC of each search, RSS of the search process
   after every trial.
2. **The paper's epoch budget** (``--paper-epochs``), once per ``--patience`` (5: early
   stopping as `ctedge tune` has it; 100: none, as the paper trained): the cached
   search measured whole; the naive search *extrapolated* from part 1's measured
   naive epochs (per-trial start-up + epochs run x seconds per epoch), with each
   trial running the epochs its cached twin ran.

``--reuse REPORT.json`` takes part 1 (and any part-2 patience already there) from an
earlier report of the same settings instead of measuring it again; the report says so.

``--weights`` takes a trained ctedge model (its backbone, exactly as trained;
ImageNet weights cannot be downloaded here, and random filters would make every
AUC 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import write_results

from ctedge.core.data import DataOptions
from ctedge.core.preprocess import PreprocessConfig
from ctedge.core.runconfig import ModelConfig
from ctedge.edge.bench import machine_info


def search(args, folder: str, project: str, cache: bool, epochs: int, patience: int) -> dict:
    """One search; its wall time (setup and feature extraction included) and trials."""
    from ctedge.training.tuning import TuneOptions, tune  # here: trial processes re-import this script

    started = time.perf_counter()
    summary = tune(DataOptions(root=args.data, split_dir=args.split_dir),
                   ModelConfig(weights=args.weights, backbone=args.backbone, freeze_backbone=True),
                   PreprocessConfig(image_size=args.image_size),
                   TuneOptions(max_trials=args.trials, epochs=epochs, views=args.views, directory=folder,
                               project=project, cache=cache, patience=patience))
    wall = time.perf_counter() - started
    trials = sorted(summary["trials"], key=lambda t: t["trial"])
    return {"wall_seconds": wall, "trials": len(trials), "trials_per_hour": len(trials) / wall * 3600,
            "search_seconds": summary["search_seconds"], "best_val_auc": summary["best_score"],
            "best_hyperparameters": summary["best_hyperparameters"],
            "per_trial": [{k: t[k] for k in ("trial", "units", "learning_rate", "dropout", "score", "seconds",
                                              "epochs_run", "fit_seconds", "rss_mb", "pid")} for t in trials]}


def extrapolated_naive(naive: dict, cached: dict) -> dict:
    """Naive search time for the cached search's trials: start-up + epochs x s/epoch."""
    per_epoch = [t["fit_seconds"] / t["epochs_run"] for t in naive["per_trial"] if t["epochs_run"]]
    startup = [t["seconds"] - t["fit_seconds"] for t in naive["per_trial"]]
    epoch_s, startup_s = float(np.median(per_epoch)), float(np.median(startup))
    setup_s = naive["wall_seconds"] - sum(t["seconds"] for t in naive["per_trial"])  # data loading
    seconds = setup_s + sum(startup_s + t["epochs_run"] * epoch_s for t in cached["per_trial"])
    return {"seconds_per_epoch": epoch_s, "startup_seconds_per_trial": startup_s, "setup_seconds": setup_s,
            "epochs": int(sum(t["epochs_run"] for t in cached["per_trial"])), "wall_seconds": seconds,
            "trials": cached["trials"], "trials_per_hour": cached["trials"] / seconds * 3600}


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    a = report["agreement"]
    lines = [f"# Tuning speed: cached features vs naive Keras Tuner ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average before/after "
             f"{report['load_before']} / {report['load_after']}. Data: {s['data']} "
             f"({'official' if s['split_dir'] else 'seeded random'} train/val split), {s['image_size']} px, frozen backbone of `{s['weights']}` (a model "
             f"trained here), {s['views']} cached views per training image, random search, seed 42, "
             f"{s['trials']} trials.", "",
             f"## 1. Both searches measured: {s['trials']} trials x {s['epochs']} epochs", "",
             "| mode | wall s (setup, extraction included) | trials/hour | s per trial (median) | best val AUC | "
             "search-process RSS after trials 1, 5, 10, ..., last (MB) |", "|---|---|---|---|---|---|"]
    for mode in ("cached", "naive"):
        r = a[mode]
        rss = [t["rss_mb"] for t in r["per_trial"]]
        shown = [rss[0]] + rss[4::5] + ([rss[-1]] if len(rss) % 5 else [])
        lines.append(f"| {mode} | {r['wall_seconds']:.0f} | {r['trials_per_hour']:.1f} | "
                     f"{np.median([t['seconds'] for t in r['per_trial']]):.1f} | {r['best_val_auc']:.4f} | "
                     + ", ".join(f"{v:.0f}" for v in shown) + " |")
    pairs = [(c["score"], n["score"]) for c, n in zip(a["cached"]["per_trial"], a["naive"]["per_trial"])]
    diffs = [c - n for c, n in pairs if c is not None and n is not None]
    measured = f" ({a['measured']})" if a.get("measured") else ""
    lines += ["", f"Measured{measured}. Speed-up **{a['speedup']:.1f}x** in trials/hour; best val AUC cached - naive "
              f"**{a['auc_difference']:+.4f}** (target within ±0.01). Same trial, cached - naive val AUC: "
              f"median {np.median(diffs):+.4f}, largest |Δ| {np.max(np.abs(diffs)):.4f} over {len(diffs)} trials. "
              f"Naive trials ran each in a fresh process (pids {len({t['pid'] for t in a['naive']['per_trial']})} "
              "distinct); the RSS column is the search process's.", "",
              f"## 2. The paper's budget: {s['trials']} trials, up to {s['paper_epochs']} epochs", "",
              "| mode | early stopping | how | epochs run (all trials) | wall s | trials/hour | best val AUC | "
              "speed-up (trials/hour) |", "|---|---|---|---|---|---|---|---|"]
    for b in report["paper"]:
        stopping = "none" if b["patience"] >= s["paper_epochs"] else f"patience {b['patience']}"
        lines += [f"| cached | {stopping} | measured{' (' + b['measured'] + ')' if b.get('measured') else ''} | "
                  f"{b['naive']['epochs']} | {b['cached']['wall_seconds']:.0f} | "
                  f"{b['cached']['trials_per_hour']:.0f} | {b['cached']['best_val_auc']:.4f} | **{b['speedup']:.0f}x** |",
                  f"| naive | {stopping} | **extrapolated** from part 1: {b['naive']['startup_seconds_per_trial']:.1f} s "
                  f"start-up per trial + {b['naive']['seconds_per_epoch']:.1f} s per epoch, the cached trials' epochs | "
                  f"{b['naive']['epochs']} | {b['naive']['wall_seconds']:.0f} | {b['naive']['trials_per_hour']:.2f} | "
                  "not run | |"]
    lines += ["", "Speed-up: trials/hour with the one-time feature extraction counted (target ≥ 50x).", "",
              "Command: `python benchmarks/tune_speed.py " + " ".join(report["argv"]) + "`"
              + (f"; the reused run's: `python benchmarks/tune_speed.py {' '.join(report['reused_argv'])}`"
                 if report.get("reused_argv") else ""), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split-dir")
    parser.add_argument("--weights", required=True, help="A trained ctedge model (.keras or run folder).")
    parser.add_argument("--backbone", default="b3", help="The trained model's backbone (tiny: a smoke test).")
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="Part 1's epochs per trial (both searches).")
    parser.add_argument("--paper-epochs", type=int, default=100)
    parser.add_argument("--patience", default="5,100", help="Part 2's early-stopping patiences (>= epochs: none).")
    parser.add_argument("--reuse", type=Path, help="An earlier report: its part 1 (and part-2 rows) are not rerun.")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tune_speed")
    args = parser.parse_args()
    report = {"machine": machine_info(None), "date": time.strftime("%Y-%m-%d %H:%M"),
              "settings": {**vars(args), "out": str(args.out)}, "argv": sys.argv[1:],
              "load_before": [round(v, 2) for v in os.getloadavg()]}
    earlier = json.loads(args.reuse.read_text()) if args.reuse else None
    with tempfile.TemporaryDirectory() as folder:
        if earlier:
            agreement = {**earlier["agreement"], "measured": f"in the run of {earlier['date']}"}
            report["reused_argv"] = earlier["argv"]
        else:
            agreement = {mode: search(args, folder, mode, mode == "cached", args.epochs, args.epochs)
                         for mode in ("cached", "naive")}
            agreement["speedup"] = agreement["cached"]["trials_per_hour"] / agreement["naive"]["trials_per_hour"]
            agreement["auc_difference"] = agreement["cached"]["best_val_auc"] - agreement["naive"]["best_val_auc"]
        report["agreement"] = agreement
        report["paper"] = []
        for patience in (int(p) for p in args.patience.split(",")):
            done = [b for b in (earlier or {}).get("paper", []) if b["patience"] == patience]
            if done:
                report["paper"].append({**done[0], "measured": f"in the run of {earlier['date']}"})
                continue
            cached = search(args, folder, f"paper-{patience}", True, args.paper_epochs, patience)
            naive = extrapolated_naive(agreement["naive"], cached)
            report["paper"].append({"patience": patience, "cached": cached, "naive": naive,
                                    "speedup": cached["trials_per_hour"] / naive["trials_per_hour"]})
            print(patience, json.dumps(report["paper"][-1]["speedup"]), flush=True)
    report["load_after"] = [round(v, 2) for v in os.getloadavg()]
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
