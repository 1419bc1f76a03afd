"""Issue 29's table from the committed benchmark results: each target beside what the
benchmarks measured on the machine they ran on and, where they timed it too, 15671a6's
figure on that same machine.

    python benchmarks/targets.py   # reads results/{startup,study,suite}_speed.json,
                                   # writes results/targets.{json,md}

The targets were set on issue 29's 2-core AMD EPYC (one with BF16) against 15671a6's
figures there. On another CPU an absolute target may be out of reach for either commit,
so each row also gives the ratio to 15671a6 on the same machine beside the ratio the
target asks of 15671a6's EPYC figure (target / that figure): a ratio within it would meet
the target there if both commits scale alike between the two CPUs, an estimate, not a
measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from results_io import write_results

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Row:
    name: str
    target: float  # at most, in ``unit``
    unit: str
    here: float
    baseline_here: float | None = None  # 15671a6 on the same machine
    baseline_epyc: tuple[float, float] | None = None  # 15671a6 on issue 29's EPYC (its range)
    source: str = ""

    @property
    def ratio(self) -> float | None:
        return self.here / self.baseline_here if self.baseline_here else None

    @property
    def asked_ratio(self) -> tuple[float, float] | None:
        """The ratio to 15671a6 the target asks on the EPYC: against its worst and best reading."""
        if not self.baseline_epyc:
            return None
        return self.target / max(self.baseline_epyc), self.target / min(self.baseline_epyc)


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run benchmarks/{name}.py first")
    return json.loads(path.read_text())


def _command(startup: dict, label: str) -> dict:
    """One command's figures from startup_speed.json; a results file from another version of
    that benchmark is named, not a KeyError."""
    if label not in startup.get("commands", {}):
        raise SystemExit(f"{RESULTS / 'startup_speed.json'}: no '{label}' row; rerun benchmarks/startup_speed.py")
    return startup["commands"][label]


def rows() -> tuple[list[Row], dict]:
    """The issue's rows from the results files, and the machine the study benchmark ran on."""
    startup, study, suite = _load("startup_speed"), _load("study_speed"), _load("suite_speed")
    png, helps = (_command(startup, label) for label in ("predict one PNG, onnxruntime fp32", "ctedge --help"))
    fastest = min((r for r in study["studies"] if not r["options"]["slice_step"]),
                  key=lambda r: r["process_wall_s"]["median"])
    today, old = (statistics.median(run["wall_s"] for run in suite["commits"][k]["runs"]) for k in ("today", "baseline"))
    found = [
        Row("process start -> first prediction, edge install (`ctedge predict MODEL one.png`, onnxruntime)", 0.5, "s",
            png["wall_s"]["median"], png.get("baseline", {}).get("wall_s", {}).get("median"), (0.49, 0.49),
            "startup_speed"),
        Row("`ctedge --help`", 0.3, "s", helps["wall_s"]["median"],
            helps.get("baseline", {}).get("wall_s", {}).get("median"), None, "startup_speed"),
        Row("300-slice 512x512 study (+ a scout) -> patient answer, fastest engine "
            f"({fastest['runtime']} {fastest['precision']} here)", 1.5, "s",
            fastest["process_wall_s"]["median"], fastest.get("baseline_process_wall_s", {}).get("median"),
            (1.71, 2.23), "study_speed"),
    ]
    headers = study.get("headers")
    if headers:
        found.append(Row("headers and series selection for those 300 files", 0.15, "s", headers["median"],
                         headers.get("baseline", {}).get("median"), (0.12, 0.12), "study_speed"))
    nifti = study.get("nifti_against_dicom")
    if nifti:
        found.append(Row("a real 99-slice series as one `.nii.gz` against its DICOM folder", 1.5, "x",
                         nifti["ratio"], None, None, "study_speed"))
    found.append(Row("pytest on a fresh clone (`git archive` tree, as CI runs it)", 180, "s", today, old, (193, 193),
                     "suite_speed"))
    return found, study["studies"][0]["machine"]


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}x" if unit == "x" else (f"{value:.0f} s" if value >= 10 else f"{value:.2f} s")


def markdown(found: list[Row], machine: dict) -> str:
    lines = ["# Issue 29's targets against the committed benchmark results (`benchmarks/targets.py`)", "",
             f"Machine of the figures: {machine['cpu']}, {machine['cores']} cores (each results file describes "
             "its own run). \"15671a6 here\": that commit's code timed by the same benchmark on the same machine, "
             "interleaved. \"Asked ratio\": the target over 15671a6's figure on the AMD EPYC where issue 29 set the "
             "targets (its worst and best reading; a CPU with BF16, where OpenVINO BF16 was the fastest engine, so "
             "not necessarily the machine here): a ratio here within it would meet the target there if both commits "
             "scale alike between the CPUs (an estimate).", "",
             "| | target | here | met here | 15671a6 here | ratio | asked ratio | ratio within it | from |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in found:
        asked = row.asked_ratio
        if row.ratio is None or asked is None:
            within = "–"
        else:
            within = "yes" if row.ratio <= asked[0] else ("against the best reading" if row.ratio <= asked[1] else "no")
        asked_text = "–" if asked is None else (f"{asked[0]:.2f}x" if asked[0] == asked[1]
                                                 else f"{asked[0]:.2f}-{asked[1]:.2f}x")
        lines.append(f"| {row.name} | ≤ {_figure(row.target, row.unit)} | {_figure(row.here, row.unit)} | "
                     f"{'yes' if row.here <= row.target else '**no**'} | {_figure(row.baseline_here, row.unit)} | "
                     f"{'–' if row.ratio is None else f'{row.ratio:.2f}x'} | {asked_text} | {within} | "
                     f"`{row.source}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "targets")
    args = parser.parse_args()
    found, machine = rows()
    table = markdown(found, machine)
    write_results(args.out, {"machine": machine, "rows": [{**asdict(r), "ratio": r.ratio, "asked_ratio": r.asked_ratio}
                                                          for r in found]}, table)
    print(table)


if __name__ == "__main__":
    main()
