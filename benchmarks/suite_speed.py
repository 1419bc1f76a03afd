"""The test suite's speed (issue 29): `pytest -q` as CI runs it, on a commit's whole tree
exported by ``git archive`` (what a fresh clone has; HEAD by default), with this Python and
its installed packages; with ``--baseline REV`` also that commit's tree, the runs interleaved,
so the two figures come from one machine in one sitting.

    CTEDGE_REQUIRE_PACS=1 python benchmarks/suite_speed.py --baseline 15671a6
                                        # writes benchmarks/results/suite_speed.{json,md}

Each run: wall time, the CPU time of pytest and every process it started (user + sys), the
tests passed/failed/skipped and the slowest tests pytest reports (``--durations``). A past
commit's tests run against today's packages, so some may fail where an interface moved
since (typer's help, for one): the table counts them. Run it with nothing else on the
cores; one run of the suite takes minutes.
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
from baseline import code_env, commit_of, exported  # noqa: E402
from results_io import machine_sentence, write_results  # noqa: E402

from ctedge.edge.bench import machine_info  # noqa: E402

OUTCOMES = ("passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected")


def run_suite(tree: Path, env: dict[str, str], extra: list[str]) -> dict:
    """One `pytest -q` in ``tree``: wall, CPU (pytest and its children), outcomes, slowest tests."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra], cwd=tree,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", summary) if name in OUTCOMES}
    if not counts:
        raise SystemExit(f"pytest in {tree} ended without a summary (exit {done.returncode}): "
                         f"{(done.stdout + done.stderr)[-800:]}")
    slowest = [{"seconds": float(s), "when": when, "test": test} for s, when, test in
               re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", done.stdout, re.M)]
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "exit_code": done.returncode, "outcomes": counts, "summary": summary, "failed": failed,
            "slowest": slowest}


def median_of(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def markdown(report: dict) -> str:
    lines = [f"# Test suite (`benchmarks/suite_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             machine_sentence(report) + f" `pytest -q {' '.join(report['args'])}` "
             f"(each commit's own addopts and conftest: pytest-xdist's `-n auto`) on each commit's `git archive` tree "
             "with this Python "
             f"and its packages; CTEDGE_REQUIRE_PACS={report['require_pacs'] or 'unset'}. "
             f"Medians of {report['runs']} run(s), commits interleaved.", "",
             "| commit | tests | passed | failed | wall s | CPU s | wall s per 100 tests |",
             "|---|---|---|---|---|---|---|"]
    for label, row in report["commits"].items():
        last = row["runs"][-1]["outcomes"]
        tests = sum(n for name, n in last.items() if name != "deselected")
        wall = median_of(row["runs"], "wall_s")
        failed = last.get("failed", 0) + last.get("errors", 0)
        lines.append(f"| {label} ({row['commit']}) | {tests} | {last.get('passed', 0)} | {failed} | {wall:.0f} | "
                     f"{median_of(row['runs'], 'cpu_s'):.0f} | {100 * wall / max(tests, 1):.1f} |")
    if "baseline" in report["commits"]:
        today, then = (median_of(report["commits"][k]["runs"], "wall_s") for k in ("today", "baseline"))
        lines += ["", f"Wall time today / at {report['commits']['baseline']['commit']}: **{today / then:.2f}x**."]
        gone = report["commits"]["baseline"]["runs"][-1]["failed"]
        if gone:
            lines += ["", f"The baseline's failures with today's packages: {', '.join(f'`{t}`' for t in gone)}."]
    for label, row in report["commits"].items():
        lines += ["", f"Slowest at {label} ({row['commit']}, last run):", ""]
        lines += [f"- {s['seconds']:.1f} s {s['when']} `{s['test']}`" for s in row["runs"][-1]["slowest"][:10]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="The commit timed as today's (default HEAD: commit first).")
    parser.add_argument("--baseline", metavar="REV", help="Also time this commit's suite (e.g. 15671a6), interleaved.")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-suite"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "suite_speed")
    parser.add_argument("pytest_args", nargs="*", help="After --: more pytest arguments (e.g. -m 'not ray').")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    revs = {"today": args.rev, **({"baseline": args.baseline} if args.baseline else {})}
    commits = {label: commit_of(rev) for label, rev in revs.items()}
    trees = {label: exported(commit, args.work) for label, commit in commits.items()}
    envs = {label: code_env(tree / "src", f"{label} ({commits[label]})") for label, tree in trees.items()}
    extra = ["--durations=15", *args.pytest_args]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {label: [] for label in revs}
    for turn, label in itertools.product(range(args.runs), revs):
        print(f"run {turn + 1}/{args.runs}: {label} ({commits[label]}) ...", flush=True)
        runs[label].append(run_suite(trees[label], envs[label], extra))
        print(f"  {runs[label][-1]['summary']}", flush=True)
    report = {"machine": machine_info(None), "runs": args.runs, "args": extra,
              "require_pacs": os.environ.get("CTEDGE_REQUIRE_PACS"),
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "commits": {label: {"rev": revs[label], "commit": commits[label], "runs": runs[label]}
                          for label in revs}}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
