"""Helpers for the `ctedge serve` tests: free loopback ports, a test SCP that collects
SRs, a pynetdicom sender, a node started in-process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from ctedge.edge.serve.config import Destination, ServeConfig
from ctedge.edge.serve.node import CT_IMAGE_STORAGE
from ctedge.edge.serve.service import Service
from helpers import brightness_onnx, free_port

LOOPBACK = "127.0.0.1"


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Collector:
    """A destination PACS stand-in: a Storage SCP that keeps every SR (and Secondary
    Capture) it receives."""

    def __init__(self, ae_title: str = "RESULTS"):
        self.ae_title, self.received, self.encoded = ae_title, [], []
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Comprehensive3DSRStorage)
        self.ae.add_supported_context(SecondaryCaptureImageStorage)
        self.port = free_port()
        self.server = None

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        self.encoded.append(event.encoded_dataset(include_meta=False))  # the bytes as sent
        return 0x0000

    def start(self) -> Collector:
        self.server = self.ae.start_server((LOOPBACK, self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server = None

    @property
    def destination(self) -> Destination:
        return Destination(self.ae_title, LOOPBACK, self.port)

    def sr_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.received}


def send_files(paths, port: int, ae_title: str = "SCANNER", called: str = "CTEDGE", syntax: str | None = None,
               ssl_context=None) -> list[int] | None:
    """C-STORE files (optionally compressed to ``syntax`` first); the statuses, or None
    when the association was rejected."""
    datasets = [pydicom.dcmread(p) for p in paths]
    if syntax is not None:
        for ds in datasets:
            ds.compress(syntax)
    ae = AE(ae_title=ae_title)
    syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets})
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, syntaxes)
    tls = (ssl_context, "localhost") if ssl_context else None
    assoc = ae.associate(LOOPBACK, port, ae_title=called, tls_args=tls)
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def study_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


@contextlib.contextmanager
def running_service(tmp: Path, model: Path, faults=None, **options):
    """A node on free loopback ports with a spool under ``tmp``; stopped on exit. Its periods
    are tiny (no test waits for a real one); ``faults``: a Faults with a test's hook."""
    values = dict(model=model, spool=tmp / "spool", dicom_port=free_port(), http_port=free_port(),
                  quiet_seconds=0.3, min_free_disk=0, retry_seconds=0.2, runtime="onnxruntime",
                  disk_check_seconds=0.05, retention_seconds=0.05, loop_restart_seconds=0.05)
    values.update(options)
    service = Service(ServeConfig(**values), faults)
    service.start()
    try:
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def http_server(app, port: int | None = None):
    """``app`` on uvicorn in a thread, on ``port`` or a free loopback port (yielded)."""
    import threading

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory) -> Path:
    """The TensorFlow-free stand-in model (32 px): builds in milliseconds."""
    return brightness_onnx(tmp_path_factory.mktemp("serve-model") / "brightness.onnx", size=32)


__all__ = ["CT_IMAGE_STORAGE", "Collector", "NodeProcess", "free_port", "http_server", "running_service", "send_files", "serve_model",
           "study_files", "wait_for"]


class NodeProcess:
    """`ctedge serve` as a subprocess (what an operator runs), on given loopback ports."""

    def __init__(self, model: Path, spool: Path, *args: str, dicom_port: int | None = None,
                 env: dict[str, str] | None = None):
        self.dicom_port, self.http_port = dicom_port or free_port(), free_port()
        self.env = env or {}  # e.g. CTEDGE_CRASH_AT (ctedge.edge.serve.faults)
        self.command = [sys.executable, "-m", "ctedge.cli", "serve", str(model), "--spool", str(spool),
                        "--dicom-port", str(self.dicom_port), "--http-port", str(self.http_port),
                        "--min-free-disk", "0", "--runtime", "onnxruntime", *args]
        self.log = spool.parent / f"serve-{self.http_port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> NodeProcess:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **self.env)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, timeout=60, what=f"`ctedge serve` to be ready (log: {self.log})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"`ctedge serve` exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return self.get("/readyz")[0] == 200
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, dict | str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=5) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def died(self) -> bool:
        """Whether the process has ended (killed itself at a crash point, say)."""
        return self.process.poll() is not None

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
