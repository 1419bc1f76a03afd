"""Which nodes of an exported model run on the CPU under onnxruntime's CUDA provider, and
how many Memcpy nodes onnxruntime inserts between them (issue 21, item 3).

    python benchmarks/cuda_placement.py --model exports/b3-300.onnx   # needs ctedge[cuda] and a GPU

A child process opens the session with verbose logging (onnxruntime writes its node
placement and its "N Memcpy nodes are added" warning to stderr from C++), and this
script counts what it says: the Memcpy nodes, and the op types placed on each provider.
Without CUDA it says so and exits 1; it never reports a count it did not read.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()
options = ort.SessionOptions()
options.log_severity_level = 0
session = ort.InferenceSession(sys.argv[1], options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("PROVIDERS", ",".join(session.get_providers()), flush=True)
"""
MEMCPY = re.compile(r"(\d+) Memcpy nodes are added to the graph")
# verbose placement lines: " All nodes placed on [CUDAExecutionProvider]" or
# " Node(s) placed on [CPUExecutionProvider]. Number of nodes: N" followed by "  OpType (name)" lines
PLACED = re.compile(r"placed on \[(\w+)\]\. Number of nodes: (\d+)")
HEADER = re.compile(r"^\S+ \S+ \[\w:onnxruntime:[^\]]*\] ")  # "DATE TIME [V:onnxruntime:, file:line func] "
NODE = re.compile(r"^\s+(\w+) \(([^)]*)\)\s*$")


def placement(model: Path) -> dict:
    """The child's session log, read: Memcpy count and op types per provider."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(model)], capture_output=True, text=True)
    log = done.stderr + done.stdout
    providers = next((line.split(" ", 1)[1].split(",") for line in done.stdout.splitlines()
                      if line.startswith("PROVIDERS ")), [])
    if done.returncode != 0 or "CUDAExecutionProvider" not in providers:
        raise SystemExit(f"CUDA did not start here (providers {providers or 'none'}): {log.strip()[-500:]}")
    memcpy = [int(n) for n in MEMCPY.findall(log)]
    per_provider: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    nodes_on: dict[str, int] = {}
    current = None
    for line in log.splitlines():
        message = HEADER.sub("", line)
        if (found := PLACED.search(message)):
            current, nodes_on[found.group(1)] = found.group(1), int(found.group(2))
        elif current and (node := NODE.match(message)):
            per_provider[current][node.group(1)] += 1
        else:
            current = None
    return {"model": str(model), "providers": providers, "memcpy_nodes": sum(memcpy) if memcpy else 0,
            "memcpy_warning_seen": bool(memcpy), "nodes_by_provider": nodes_on,
            "op_types_by_provider": {p: dict(c.most_common()) for p, c in per_provider.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = placement(args.model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
