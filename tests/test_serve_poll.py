"""Poll mode and DICOMweb both ways against a real PACS (Orthanc with its DICOMweb plugin,
``orthanc_fixture``): the node polls for new CT studies, takes each once (also across a
restart), skips a localizer-only and an MR study by its rules without retrieving them, and
sends the SR back by STOW-RS, where QIDO-RS finds it in the right study with the right
probability; Orthanc's own DICOMweb client stores a study to the node by STOW-RS."""

from __future__ import annotations

import datetime
import json
import urllib.request

import numpy as np

from ctedge.core.phantom_studies import CORONAL, fixed_uid, phantom_volume, write_series
from ctedge.edge.runtime import Classifier
from ctedge.edge.serve.config import WebDestination
from ctedge.edge.serve.http import create_app
from ctedge.edge.serve.sr import read_sr
from ctedge.edge.study import StudyOptions, classify_study, find_studies
from orthanc_fixture import LOOPBACK, Orthanc, free_port, orthanc
from serve_fixtures import http_server, running_service, serve_model, study_files, wait_for

__all__ = ["orthanc", "serve_model"]
TODAY = datetime.date.today().strftime("%Y%m%d")
YESTERDAY = (datetime.date.today() - datetime.timedelta(days=1)).strftime("%Y%m%d")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
FAST = dict(quiet_seconds=0.2, poll_every=0.2)


def pacs_study(folder, seed: int, *, axial: str | None = "CT", scout: bool = True, date: str = TODAY) -> str:
    """A study as a PACS holds it (StudyDate ``date``): an axial series (``axial``: its modality, or
    None) and a CT scout; its StudyInstanceUID."""
    rng = np.random.default_rng(seed)
    uid, tags = fixed_uid(rng), {"StudyDate": date, "AccessionNumber": f"POLL-{seed}", "BodyPartExamined": "CHEST"}
    if axial:
        write_series(folder, phantom_volume(rng, 12, 32, True), rng, study_uid=uid, patient_id=f"P-{seed}",
                     modality=axial, tags={**tags, **({"SOPClassUID": MR_IMAGE_STORAGE} if axial == "MR" else {})})
    if scout:
        write_series(folder, phantom_volume(rng, 2, 32), rng, study_uid=uid, patient_id=f"P-{seed}",
                     orientation=CORONAL, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="SCOUT",
                     tags=tags)
    return uid


def _qido(pacs: Orthanc, path: str) -> list:
    with urllib.request.urlopen(f"{pacs.dicomweb_url}{path}", timeout=10) as response:
        return json.loads(response.read() or b"[]")


def srs_in(pacs: Orthanc, study_uid: str) -> list[str]:
    """The SOP Instance UIDs of the SRs QIDO-RS finds in the study."""
    return [item["00080018"]["Value"][0] for item in _qido(pacs, f"/studies/{study_uid}/instances?Modality=SR")]


def test_the_node_polls_takes_each_study_once_and_sends_the_sr_back_by_stow(tmp_path, orthanc, serve_model):
    """Studies of yesterday (``--poll-since``, and kept in the window while one waits): one CT
    study is taken, classified as `predict --study` classifies its files, and its SR found by
    QIDO-RS in its study with its probability; the localizer-only and the MR study are not
    eligible with why, nothing retrieved. After a restart on the same spool, with all of them
    in the query's answer again, nothing is taken again, and a study new on the PACS is."""
    ct, scout_only, mr = (pacs_study(tmp_path / name, seed, date=YESTERDAY, **kw) for name, seed, kw in (
        ("ct", 101, {}), ("scout", 102, {"axial": None}), ("mr", 103, {"axial": "MR"})))
    for name in ("ct", "scout", "mr"):
        orthanc.upload(study_files(tmp_path / name))
    web = f"dicomweb:{orthanc.dicomweb_url}"
    options = dict(FAST, poll=web, poll_since=YESTERDAY, destination=[WebDestination(orthanc.dicomweb_url)])
    with running_service(tmp_path, serve_model, **options) as service:
        answer = wait_for(lambda: (view := service.study_view(ct)[1]) and view.get("sent") and view, timeout=30,
                          what="the SR stored in Orthanc")
        refused = {uid: wait_for(lambda uid=uid: (view := service.study_view(uid)[1]) and
                                 view["status"] == "not eligible" and view, what="not eligible")
                   for uid in (scout_only, mr)}
        ready = service.readiness()[1]
        service.journal.set_meta("poll.since", YESTERDAY)  # the next query answers all of them again
    expected = classify_study(Classifier(serve_model, runtime="onnxruntime"), find_studies(tmp_path / "ct")[0],
                              StudyOptions())
    assert abs(answer["result"]["probability"] - expected.probability) <= 1e-6
    [sr_uid] = srs_in(orthanc, ct)
    assert sr_uid == answer["sr_uid"] and answer["deliveries"][0]["destination"] == web
    with urllib.request.urlopen(f"{orthanc.dicomweb_url}/studies/{ct}/series/{_sr_series(orthanc, ct)}/instances/"
                                f"{sr_uid}", timeout=10) as response:
        stored = response.read()
    sr = read_sr(stored[stored.index(b"\r\n\r\n") + 4:stored.rindex(b"\r\n--")])
    assert abs(sr["measurements"]["Probability"] - expected.probability) <= 1e-6
    assert refused[scout_only]["status"] == refused[mr]["status"] == "not eligible"
    assert "LOCALIZER" in refused[scout_only]["result"]["not_eligible"]
    assert "modality MR, not CT" in refused[mr]["result"]["not_eligible"]
    assert ready["poll"]["failing"] is None and ready["loops"]["poll"]["state"] == "running"

    late = pacs_study(tmp_path / "late", 104)
    with running_service(tmp_path, serve_model, **options) as service:
        orthanc.upload(study_files(tmp_path / "late"))
        wait_for(lambda: service.study_view(late)[1] and service.study_view(late)[1].get("sent"), timeout=30,
                 what="the new study answered")
        answers = dict(service.journal.rows("SELECT s.study_uid, COUNT(*) FROM answers a JOIN studies s "
                                            "ON s.id=a.study_id GROUP BY s.study_uid"))
        held = {uid: service.journal.study(uid) for uid in (scout_only, mr)}
    assert answers == {ct: 1, late: 1} and srs_in(orthanc, ct) == [sr_uid] and len(srs_in(orthanc, late)) == 1
    assert held == {scout_only: None, mr: None}  # never retrieved


def _sr_series(pacs: Orthanc, study_uid: str) -> str:
    [series] = _qido(pacs, f"/studies/{study_uid}/series?Modality=SR")
    return series["0020000E"]["Value"][0]


def test_the_node_polls_by_dimse_and_a_pacs_stores_to_it_by_stow(tmp_path, serve_model):
    """C-FIND + C-GET poll (the PACS knows the node's AE title); and Orthanc's DICOMweb client
    (``/dicom-web/servers/ctedge/stow``) sends a study to the node, answered as if pushed."""
    polled, stowed = pacs_study(tmp_path / "polled", 105), pacs_study(tmp_path / "stowed", 106, scout=False)
    http_port = free_port()
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True, modalities={"ctedge": ["CTEDGE", LOOPBACK, free_port()]},
                   servers={"ctedge": [f"http://{LOOPBACK}:{http_port}/dicomweb", "any", "stow-token"]})
    try:
        pacs.upload(study_files(tmp_path / "polled"))
        with running_service(tmp_path, serve_model, poll=pacs.peer, token="stow-token", **FAST) as service, \
                http_server(create_app(service), port=http_port):
            by_poll = wait_for(lambda: (v := service.study_view(polled)[1]) and v.get("result") and v, timeout=30,
                               what="the polled study answered")
            orthanc_study = pacs.upload(study_files(tmp_path / "stowed"))
            pacs.rest("/dicom-web/servers/ctedge/stow", json.dumps({"Resources": [orthanc_study]}).encode())
            by_stow = wait_for(lambda: (v := service.study_view(stowed)[1]) and v.get("result") and v, timeout=30,
                               what="the STOWed study answered")
    finally:
        pacs.stop()
    assert by_poll["status"] == by_stow["status"] == "answered" and by_poll["instances"] == 12
    assert by_stow["instances"] == 12 and by_stow["completion"] == "COMPLETE"


def test_a_poll_that_fails_shows_in_readyz_and_a_huge_answer_is_refused(tmp_path, serve_model):
    """A QIDO-RS answer of 100,000 studies (past the 8 MiB bound) is refused, nothing taken:
    /readyz is 503 naming the poll and why, the poll loop still running; a PACS that answers
    again makes it ready."""
    from fastapi import FastAPI
    from fastapi.responses import Response

    app, huge = FastAPI(), {"on": True}
    study = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "00100020": {"vr": "LO", "Value": ["P"]}}

    @app.get("/dicom-web/studies")
    def studies() -> Response:
        return Response(json.dumps([study] * 100_000 if huge["on"] else []), media_type="application/dicom+json")

    with http_server(app) as port, \
            running_service(tmp_path, serve_model, poll=f"dicomweb:http://127.0.0.1:{port}/dicom-web", **FAST) as service:
        failing = wait_for(lambda: not (ready := service.readiness())[0] and ready[1], what="the poll failing")
        huge["on"] = False
        wait_for(lambda: service.readiness()[0], what="ready again")
        taken = service.journal.value("SELECT COUNT(*) FROM polled")
    assert any(reason.startswith(f"the poll of http://127.0.0.1:{port}/dicom-web fails: ") and "8,388,608 bytes" in
               reason for reason in failing["reasons"])
    assert failing["loops"]["poll"]["state"] == "running" and taken == 0
