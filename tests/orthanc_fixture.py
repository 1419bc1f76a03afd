"""A real PACS for the tests: Orthanc (with its DICOMweb plugin) started from a generated
configuration in a tmp folder, loopback only, plus dcmtk's tools. Missing binaries skip
the tests that need them, unless CTEDGE_REQUIRE_PACS=1 (as in .ci/run, which installs
them), where they fail.

One Orthanc starts in about a second; a test module shares one (``orthanc`` fixture) and
keeps its studies apart by AccessionNumber.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest

from serve_fixtures import LOOPBACK, free_port, wait_for

ORTHANC, STORESCU, ECHOSCU = Path("/usr/sbin/Orthanc"), Path("/usr/bin/storescu"), Path("/usr/bin/echoscu")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL = "apt-get install orthanc orthanc-dicomweb dcmtk"


def require(binary: Path) -> None:
    if not binary.is_file():
        message = f"{binary} not found ({INSTALL})"
        if os.environ.get("CTEDGE_REQUIRE_PACS") == "1":
            pytest.fail(message)
        pytest.skip(message)


class Orthanc:
    """An Orthanc started with a generated configuration in ``folder`` (loopback only); it
    knows ``modalities`` (name -> [AET, host, port]); ``dicomweb`` loads the DICOMweb plugin
    (at ``/dicom-web``), which knows the DICOMweb ``servers`` (name -> [URL, user, password])."""

    def __init__(self, folder: Path, modality_port: int | None = None, *, dicomweb: bool = False,
                 modalities: dict | None = None, servers: dict | None = None):
        require(ORTHANC)
        if dicomweb:
            require(DICOMWEB_PLUGIN)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.folder = folder
        folder.mkdir()
        known = dict(modalities or {})
        if modality_port is not None:
            known["ctedge"] = ["CTEDGE", LOOPBACK, modality_port]
        config = {"Name": "ctedge-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
                  "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "MaximumStorageCacheSize": 0,  # every read goes to the storage folder (a test may break a file)
                  "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
                  "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "Servers": servers or {}},
                  "DicomModalities": known}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "w")
        self.process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=30, what="Orthanc")

    @property
    def dicomweb_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}/dicom-web"

    @property
    def peer(self) -> str:
        return f"ORTHANC@{LOOPBACK}:{self.dicom_port}"

    def _up(self) -> bool:
        try:
            return bool(self.rest("/system"))
        except OSError:
            return False

    def rest(self, path: str, data: bytes | None = None, method: str | None = None):
        request = urllib.request.Request(f"http://{LOOPBACK}:{self.http_port}{path}", data=data,
                                         method=method or ("POST" if data is not None else "GET"))
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")

    def upload(self, files) -> str:
        """Store files over REST; Orthanc's id of their (last) study."""
        study = None
        for file in files:
            study = self.rest("/instances", Path(file).read_bytes())["ParentStudy"]
        return study

    def break_storage(self, orthanc_study: str) -> None:
        """Delete the stored files of a study (its index kept): Orthanc then fails to return it."""
        for instance in self.rest(f"/studies/{orthanc_study}/instances"):
            uuid = self.rest(f"/instances/{instance['ID']}/attachments/dicom/info")["Uuid"]
            (self.folder / "db" / uuid[:2] / uuid[2:4] / uuid).unlink()

    def stop(self) -> None:
        """Killed, not asked to stop (that takes Orthanc seconds): its database is a tmp folder."""
        self.process.kill()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """One Orthanc with DICOMweb per test module, knowing the AE title CTEDGE (for C-FIND/C-GET)."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc") / "pacs", dicomweb=True,
                     modalities={"ctedge": ["CTEDGE", LOOPBACK, free_port()]})
    try:
        yield server
    finally:
        server.stop()
