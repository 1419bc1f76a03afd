"""CI check: every install command the README documents resolves to the engine
it promises and to at most one onnxruntime distribution.

onnxruntime, onnxruntime-gpu and onnxruntime-openvino all own the same
``onnxruntime`` Python package: when two of them are installed, whichever lands
last overwrites the other's files. This asks pip what each documented install
would resolve to (``pip install --dry-run --ignore-installed --report``; nothing
is installed) and checks the onnxruntime builds and OpenVINO in it.

    python scripts/check_installs.py            # all documented installs
    python scripts/check_installs.py ".[cuda]"  # one of them

Exit code 0 when every install resolves as documented, 1 otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORT_DISTRIBUTIONS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-training", "onnxruntime-qnn"}
# README's install commands -> (the one onnxruntime build expected or None, OpenVINO expected)
DOCUMENTED = {
    ".": (None, False),
    ".[cpu]": ("onnxruntime", False),
    ".[cpu,eval]": ("onnxruntime", False),
    ".[cpu,pacs]": ("onnxruntime", False),
    ".[cpu,serve]": ("onnxruntime", False),
    ".[cuda]": ("onnxruntime-gpu", False),
    ".[openvino]": (None, True),
    ".[cpu,openvino]": ("onnxruntime", True),
    ".[cuda,openvino]": ("onnxruntime-gpu", True),
    ".[train,cpu]": ("onnxruntime", False),
    ".[train,cuda]": ("onnxruntime-gpu", False),
    ".[train,cpu,openvino]": ("onnxruntime", True),
    ".[test]": ("onnxruntime", True),
    ".[cpu,ray]": ("onnxruntime", False),
}
# The installs that hold Ray (Ray Data for `predict --study --ray`); every other one must not.
WITH_RAY = {".[cpu,ray]", ".[test]"}

# The edge box's lean installs: what an extra ([pacs], [serve]) brings must not leak into them.
LEAN = {".": {"pynetdicom", "httpx", "python-multipart", "fastapi", "highdicom"},
        ".[cpu]": {"pynetdicom", "httpx", "python-multipart", "fastapi", "highdicom"}}


def resolve(spec: str) -> list[str]:
    """Distribution names pip would install for ``spec`` into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet",
                               "--ignore-installed", "--report", str(report), spec],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"pip cannot resolve {spec}: {done.stderr.strip().splitlines()[-1:]}")
        return [item["metadata"]["name"].lower().replace("_", "-")
                for item in json.loads(report.read_text())["install"]]


def check(spec: str) -> list[str]:
    """Problems with one install; empty when it resolves as documented."""
    expected_ort, expected_ov = DOCUMENTED[spec]
    names = resolve(spec)
    ort = sorted(set(names) & ORT_DISTRIBUTIONS)
    problems = []
    if len(ort) > 1:
        problems.append(f"{len(ort)} onnxruntime builds that overwrite each other: {', '.join(ort)}")
    if ort != ([expected_ort] if expected_ort else []):
        problems.append(f"onnxruntime build {ort or 'none'}, documented {expected_ort or 'none'}")
    leaked = sorted(set(names) & LEAN.get(spec, set()))
    if leaked:
        problems.append(f"{', '.join(leaked)} in the lean install (belongs in an extra)")
    if ("openvino" in names) != expected_ov:
        problems.append(f"OpenVINO {'present' if 'openvino' in names else 'missing'}, documented "
                        f"{'present' if expected_ov else 'absent'}")
    if ("ray" in names) != (spec in WITH_RAY):
        problems.append(f"Ray {'present' if 'ray' in names else 'missing'}, documented "
                        f"{'present' if spec in WITH_RAY else 'absent'}")
    return problems


def main(specs: list[str]) -> int:
    unknown = [s for s in specs if s not in DOCUMENTED]
    if unknown:
        print(f"not a documented install: {', '.join(unknown)} (known: {', '.join(DOCUMENTED)})", file=sys.stderr)
        return 2
    def timed(spec: str) -> tuple[str, list[str], float]:
        started = time.perf_counter()
        try:
            problems = check(spec)
        except RuntimeError as exc:
            problems = [str(exc)]
        return spec, problems, time.perf_counter() - started

    failed = 0
    with ThreadPoolExecutor(4) as pool:  # pip resolves in subprocesses: four at once
        for spec, problems, seconds in pool.map(timed, specs or list(DOCUMENTED)):
            failed += bool(problems)
            verdict = "ok" if not problems else "FAIL: " + "; ".join(problems)
            print(f'pip install "{spec}": {verdict} ({seconds:.0f} s)', flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
