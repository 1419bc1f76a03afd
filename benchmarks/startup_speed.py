"""Start-up (issue 29): fresh processes, from command start to exit, for `ctedge --help`
and for one prediction the way an edge box runs it (`ctedge predict MODEL one.png` on
onnxruntime; on OpenVINO at its fastest precision here, BF16 where the CPU has it, with a
warm compiled-model cache beside it), EfficientNetB3 at 300 px. Each command runs --runs
times, the commands interleaved; medians of the wall time and of the process's CPU time
(user + sys), and the heavy packages each one imports (``python -X importtime``), with
the machine they ran on.

    python benchmarks/startup_speed.py            # writes benchmarks/results/startup_speed.{json,md}
    python benchmarks/startup_speed.py --baseline 15671a6   # and that commit's figures, same machine, same run

The model has random weights (benchmarks/make_b3.py; timing only) and lives with the
image in runs/bench-startup/ (git-ignored). Run it with nothing else on the cores: a
fresh process is mostly single-threaded Python, and another job's load shows in full.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from baseline import baseline_env, with_bytecode  # noqa: E402
from make_b3 import make_b3  # noqa: E402
from results_io import machine_sentence, write_results  # noqa: E402
from study_speed import openvino_precision  # noqa: E402

from ctedge.edge.bench import machine_info  # noqa: E402

# the packages that cost tens of milliseconds or more to import (tests/test_startup.py holds the budget)
HEAVY = ("numpy", "cv2", "PIL", "pydicom", "nibabel", "onnxruntime", "openvino", "tensorflow", "keras", "sklearn",
         "scipy", "matplotlib", "requests", "pydantic")


def commands(model: Path, image: Path) -> dict[str, list[str]]:
    precision = openvino_precision(model)
    return {"ctedge --help": ["--help"],
            "predict one PNG, onnxruntime fp32": ["predict", str(model), str(image), "--runtime", "onnxruntime"],
            f"predict one PNG, OpenVINO {precision.upper()} (warm cache)": ["predict", str(model), str(image),
                                                                         "--runtime", "openvino", "--precision",
                                                                         precision]}


def timed(args: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one fresh `python -m ctedge ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ctedge", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"`ctedge {' '.join(args)}` failed: {done.stderr[-800:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def imports(args: list[str], env: dict | None = None) -> dict:
    """Which heavy packages a fresh process imports, and the import time of its top-level modules."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ctedge", *args], capture_output=True, text=True,
                          env=env)
    rows = re.findall(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", done.stderr, re.M)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))
    return {"heavy": sorted({n.split(".")[0] for n in names} & set(HEAVY)),
            "top_level_import_s": sum(int(us) for us, _ in rows) / 1e6}


def markdown(report: dict) -> str:
    lines = [f"# Start-up (`benchmarks/startup_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             machine_sentence(report) + f" Model: `{report['model']}` "
             f"(benchmarks/make_b3.py: EfficientNetB3 at 300 px, random weights), one {report['image_px']} px PNG. "
             f"Medians of {report['runs']} fresh processes per command, commands interleaved.", "",
             "| command | wall s (median) | CPU s (median) | import time s (-X importtime) | heavy packages imported |"
             + (f" wall s at {report['baseline']} | ratio |" if report.get("baseline") else ""),
             "|---|---|---|---|---|" + ("---|---|" if report.get("baseline") else "")]
    for name, row in report["commands"].items():
        then = row.get("baseline")
        lines.append(f"| {name} | {row['wall_s']['median']:.3f} | {row['cpu_s']['median']:.3f} | "
                     f"{row['imports']['top_level_import_s']:.3f} | {', '.join(row['imports']['heavy']) or '-'} |"
                     + (f" {then['wall_s']['median']:.3f} | {row['wall_s']['median'] / then['wall_s']['median']:.2f}x |"
                        if then else ""))
    if report.get("baseline"):
        lines += ["", f"The baseline: commit {report['baseline']}'s `src/` (`git archive`), run by the same Python "
                      "and packages through PYTHONPATH, its runs interleaved with today's; ratio = today / then. "
                      "Both with their bytecode written, as an install has it."]
    lines += ["", "Commands: " + "; ".join(f"`ctedge {' '.join(row['args'])}`" for row in report["commands"].values()),
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-startup"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "startup_speed")
    parser.add_argument("--baseline", metavar="REV", help="Also time this commit's code (e.g. 15671a6, before the "
                                                          "restructure), interleaved, on this machine.")
    args = parser.parse_args()
    import cv2

    from ctedge.core.phantoms import phantom

    model = args.model or make_b3(args.work)
    image = args.work / "one.png"
    args.work.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(image), phantom(np.random.default_rng(0), 512, True))
    runs = commands(model, image)
    with_bytecode()
    commit, old_env = baseline_env(args.baseline, args.work) if args.baseline else (None, None)
    codes = {"today": None, **({"baseline": old_env} if commit else {})}
    for command, env in itertools.product(runs.values(), codes.values()):  # untimed: caches, the OS file cache
        timed(command, env)
    load_before = os.getloadavg()
    walls = {(name, code): [] for name, code in itertools.product(runs, codes)}
    cpus = {key: [] for key in walls}
    for _ in range(args.runs):
        for (name, code), times in walls.items():
            wall, cpu = timed(runs[name], codes[code])
            times.append(wall)
            cpus[name, code].append(cpu)

    def figures(name: str, code: str) -> dict:
        return {"args": runs[name], "imports": imports(runs[name], codes[code]),
                "wall_s": {"runs": walls[name, code], "median": float(np.median(walls[name, code]))},
                "cpu_s": {"runs": cpus[name, code], "median": float(np.median(cpus[name, code]))}}

    report = {"machine": machine_info(None), "runs": args.runs, "image_px": 512, "model": str(model),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "baseline": commit,
              "commands": {name: {**figures(name, "today"), **({"baseline": figures(name, "baseline")} if commit
                                                               else {})} for name in runs}}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
