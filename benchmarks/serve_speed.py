"""`ctedge serve` speed (issue 20): answer latency, ingest rate beside a bare Storage SCP,
and a load of studies from concurrent senders.

    python benchmarks/serve_speed.py        # writes benchmarks/results/serve_speed.{json,md}

The study: a synthetic 300-slice 512x512 uncompressed axial series plus a scout
(ctedge.core.phantom_studies), sent by a pynetdicom SCU on loopback, each time under new
UIDs. The node is `ctedge serve` in its own process (runtime auto: what `ctedge bench
--runtime all` saved, else onnxruntime), with EfficientNetB3 at 300 px, random weights
(benchmarks/make_b3.py; timing only). The bare SCP, in its own process too, only writes
each instance to disk (fsync, rename) and acknowledges it. Runs are interleaved.

- latency: last C-STORE response -> SR received at the destination, minus the quiet period
- ingest: study bytes / (association start -> last response), node vs bare SCP; and the same
  study by STOW-RS (`POST /dicomweb/studies`, one multipart/related request with a
  Content-Length) / (request start -> its answer)
- load: studies from concurrent senders (dcmtk's storescu processes); every one answered
  once, none lost, peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "tests"))
from make_b3 import make_b3  # noqa: E402
from results_io import write_results
from study_speed import make_study  # noqa: E402

from ctedge.edge.bench import machine_info  # noqa: E402
from helpers import free_port  # noqa: E402  (below the ephemeral range: an outgoing connection can't take it)

HOST = "127.0.0.1"
STORESCU = "/usr/bin/storescu"  # dcmtk's (pynetdicom installs an app of the same name)
BARE_SCP = r'''
import os, sys, uuid
from pathlib import Path
from pynetdicom import AE, evt, StoragePresentationContexts, ALL_TRANSFER_SYNTAXES
folder = Path(sys.argv[2])
def store(event):
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, event.encoded_dataset()); os.fsync(fd); os.close(fd)
    os.replace(tmp, folder / f"{uuid.uuid4().hex}.dcm")
    return 0
ae = AE("BARE")
ae.maximum_pdu_size = 0
for cx in StoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)])
'''


class Destination:
    """The PACS stand-in: records when each study's SR arrives."""

    def __init__(self):
        self.port, self.arrivals, self.sr_uids = free_port(), {}, {}
        ae = AE("RESULTS")
        ae.add_supported_context(Comprehensive3DSRStorage)
        self.server = ae.start_server((HOST, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        ds = event.dataset
        self.arrivals.setdefault(str(ds.StudyInstanceUID), time.perf_counter())
        self.sr_uids.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
        return 0


def renamed(datasets: list, patient: str) -> tuple[str, list]:
    """The study under new UIDs (a new study for the node each time)."""
    study, series = generate_uid(), {}
    for ds in datasets:
        ds.StudyInstanceUID, ds.PatientID = study, patient
        ds.SeriesInstanceUID = series.setdefault(ds.get("SeriesDescription", ""), generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return study, datasets


def send(datasets: list, port: int, called: str) -> dict:
    """One association; times and statuses."""
    ae = AE("SCANNER")
    ae.maximum_pdu_size = 0
    for sop_class in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(sop_class, datasets[0].file_meta.TransferSyntaxUID)
    started = time.perf_counter()
    assoc = ae.associate(HOST, port, ae_title=called)
    statuses = [getattr(assoc.send_c_store(ds), "Status", -1) for ds in datasets]  # -1: no response
    last = time.perf_counter()
    assoc.release()
    return {"started": started, "last_response": last, "statuses": statuses}


def stow(datasets: list, http_port: int) -> dict:
    """The study by STOW-RS in one request (built before the clock starts); times and statuses."""
    import http.client
    import io
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), buffer.getvalue(), b"\r\n"]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    connection = http.client.HTTPConnection(HOST, http_port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/dicomweb/studies", body=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    last = time.perf_counter()
    connection.close()
    stored = len(answer.get("00081199", {}).get("Value", []))
    return {"started": started, "last_response": last, "statuses": [0] * stored + [1] * (len(datasets) - stored),
            "http_status": response.status}


def start(command: list[str], log: Path, ready) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not ready():
        if process.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{command[:4]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process


def http_ok(port: int, path: str = "/readyz") -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ingest(run: dict, size: int) -> dict:
    seconds = run["last_response"] - run["started"]
    return {"seconds": seconds, "mb_per_s": size / seconds / 1e6, "instances_per_s": len(run["statuses"]) / seconds}


def wait_for_sr(destination, study: str, quiet: float) -> None:
    deadline = time.perf_counter() + quiet + 600
    while study not in destination.arrivals and time.perf_counter() < deadline:
        time.sleep(0.01)


def latency_and_ingest(datasets, size, node_port, bare_port, http_port, destination, quiet, runs) -> list[dict]:
    rows = []
    for i in range(runs):
        study, batch = renamed(datasets, f"BENCH-{i}")
        node = send(batch, node_port, "CTEDGE")
        wait_for_sr(destination, study, quiet)
        _, batch = renamed(datasets, f"BARE-{i}")
        bare = send(batch, bare_port, "BARE")
        stowed, batch = renamed(datasets, f"STOW-{i}")
        by_stow = stow(batch, http_port)
        wait_for_sr(destination, stowed, quiet)  # its answer is not timed, but must not overlap the next run
        rows.append({"latency_s": destination.arrivals[study] - node["last_response"] - quiet,
                     "node": ingest(node, size), "bare": ingest(bare, size), "stow": ingest(by_stow, size),
                     "all_acknowledged": set(node["statuses"]) == {0} and set(bare["statuses"]) == {0}
                     and set(by_stow["statuses"]) == {0} and by_stow["http_status"] == 200})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_renamed(files: list[Path], folder: Path, patient: str) -> str:
    """A copy of the study on disk under new UIDs (for a sender in another process)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, datasets = renamed([pydicom.dcmread(p) for p in files], patient)
    for path, ds in zip(files, datasets):
        ds.save_as(folder / path.name)
    return study


def storescu(folder: Path, port: int) -> list[int]:
    """dcmtk's storescu (another process, as a scanner is); 0 per acknowledged instance, else 1."""
    done = subprocess.run([STORESCU, "-v", "-aet", "SCANNER", "-aec", "CTEDGE", HOST, str(port),
                           *map(str, sorted(folder.iterdir()))], capture_output=True, text=True)
    ok = (done.stdout + done.stderr).count("Received Store Response (Success)")
    return [0] * ok + [1] * (len(list(folder.iterdir())) - ok)


def load(files: list[Path], work: Path, node_port, http_port, destination, studies: int, senders: int,
         quiet: float) -> dict:
    """``studies`` studies from ``senders`` concurrent storescu processes; each answered once, none lost."""
    folders = {write_renamed(files, work / "load" / str(i), f"LOAD-{i}"): work / "load" / str(i)
               for i in range(studies)}
    jobs, sent = list(folders.items()), {}

    def sender(part) -> None:
        for study, folder in part:
            sent[study] = storescu(folder, node_port)

    threads = [threading.Thread(target=sender, args=(jobs[k::senders],)) for k in range(senders)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.perf_counter() + quiet + 60 * studies
    while len([s for s in folders if s in destination.arrivals]) < studies and time.perf_counter() < deadline:
        time.sleep(0.1)
    wall = time.perf_counter() - started
    time.sleep(quiet + 1)  # room for a duplicate SR
    held = {}
    for study in folders:
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/v1/studies/{study}") as response:
            held[study] = json.loads(response.read())["instances"]
    return {"studies": studies, "senders": senders, "instances_per_study": len(files), "wall_s": wall,
            "answered": sum(s in destination.arrivals for s in folders),
            "srs_per_study": sorted({len(destination.sr_uids.get(s, ())) for s in folders}),
            "acknowledged_then_missing": sum(sent[s].count(0) - held[s] for s in folders),
            "refused": sum(len(v) - v.count(0) for v in sent.values())}


def markdown(report: dict) -> str:
    m, rows, lo = report["machine"], report["runs"], report["load"]
    med = report["median"]
    lines = [f"# `ctedge serve` speed (`benchmarks/serve_speed.py`, {time.strftime('%Y-%m-%d')})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores (shared), {m['platform']}, Python {m['python']}. "
             f"Node: `ctedge serve` (runtime {report['runtime']}), model {report['model']}, quiet period "
             f"{report['quiet_s']} s. Study: {report['instances']} instances, {report['bytes'] / 1e6:.0f} MB, "
             "sent by a pynetdicom SCU on loopback; runs interleaved with a bare pynetdicom SCP (fsync + rename) "
             "and the same study by STOW-RS (one request, http.client, Content-Length).", "",
             "| run | latency beyond the quiet period s | node C-STORE MB/s | node instances/s | bare SCP MB/s "
             "| node / bare | node STOW-RS MB/s | STOW-RS / C-STORE |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['latency_s']:.2f} | {r['node']['mb_per_s']:.1f} | {r['node']['instances_per_s']:.0f} "
                     f"| {r['bare']['mb_per_s']:.1f} | {r['node']['mb_per_s'] / r['bare']['mb_per_s']:.2f} "
                     f"| {r['stow']['mb_per_s']:.1f} | {r['stow']['mb_per_s'] / r['node']['mb_per_s']:.2f} |")
    lines += ["", f"Median: latency {med['latency_s']:.2f} s (target <= 1.0), node {med['node_mb_per_s']:.1f} MB/s "
              f"(target >= 60), node / bare {med['ratio']:.2f} (target >= 0.7); the same study by STOW-RS "
              f"{med['stow_mb_per_s']:.1f} MB/s.", "",
              f"Load: {lo['studies']} studies of {lo['instances_per_study']} instances from {lo['senders']} concurrent "
              f"dcmtk storescu senders in {lo['wall_s']:.0f} s: {lo['answered']} answered, SRs per study {lo['srs_per_study']}, "
              f"acknowledged then missing {lo['acknowledged_then_missing']}, refused {lo['refused']}; node peak RSS "
              f"{report['peak_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/bench-serve"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_speed")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or make_b3(args.work)
    folder = make_study(args.work / f"ct{args.slices}-{args.size}", args.slices, args.size)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    datasets, size = [pydicom.dcmread(p) for p in files], sum(p.stat().st_size for p in files)
    destination = Destination()
    node_port, http_port, bare_port = free_port(), free_port(), free_port()
    spool = args.work / f"spool-{os.getpid()}"
    (args.work / "bare").mkdir(exist_ok=True)
    node = start([sys.executable, "-m", "ctedge.cli", "serve", str(model), "--spool", str(spool), "--dicom-port",
                  str(node_port), "--http-port", str(http_port), "--quiet-seconds", str(args.quiet), "--runtime",
                  args.runtime, "--destination", f"RESULTS@{HOST}:{destination.port}", "--min-free-disk", "1G"],
                 args.work / "serve.log", lambda: http_ok(http_port))
    bare = start([sys.executable, "-c", BARE_SCP, str(bare_port), str(args.work / "bare")], args.work / "bare.log",
                 lambda: port_open(bare_port))
    try:
        rows = latency_and_ingest(datasets, size, node_port, bare_port, http_port, destination, args.quiet, args.runs)
        load_report = load(files, args.work, node_port, http_port, destination, args.studies, args.senders, args.quiet)
        rss = peak_rss_mb(node.pid)
        with urllib.request.urlopen(f"http://{HOST}:{http_port}/v1/model") as response:
            runtime = json.loads(response.read())["runtime"]
    finally:
        node.terminate(), bare.terminate()
        destination.server.shutdown()
    report = {"machine": machine_info(None), "model": str(model), "runtime": runtime, "quiet_s": args.quiet,
              "instances": len(files), "bytes": size, "runs": rows, "load": load_report, "peak_rss_mb": rss,
              "median": {"latency_s": statistics.median(r["latency_s"] for r in rows),
                         "node_mb_per_s": statistics.median(r["node"]["mb_per_s"] for r in rows),
                         "stow_mb_per_s": statistics.median(r["stow"]["mb_per_s"] for r in rows),
                         "ratio": statistics.median(r["node"]["mb_per_s"] / r["bare"]["mb_per_s"] for r in rows)}}
    write_results(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
