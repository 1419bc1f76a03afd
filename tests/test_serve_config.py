"""`ctedge serve` options: TOML and flags, and the messages for bad ones; the outbox's quick retries."""

from __future__ import annotations

import contextlib
import io
import socket
import time

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import Comprehensive3DSRStorage
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.edge.serve.config import Destination, Peer, load_config
from ctedge.edge.serve.disk import Pause
from ctedge.edge.serve.faults import Faults
from ctedge.edge.serve.journal import AnswerDraft, Journal, NewInstance
from ctedge.edge.serve.outbox import Outbox
from serve_fixtures import serve_model

__all__ = ["serve_model"]


def test_toml_then_flags(tmp_path, serve_model):
    toml = tmp_path / "serve.toml"
    toml.write_text(f'model = "{serve_model}"\nae-title = "EDGE1"\nallow = ["PACS@127.0.0.1", "WS"]\n'
                    'destination = ["PACS@127.0.0.1:4242"]\nquiet_seconds = 2.5\nmax-instance-bytes = "2M"\n'
                    'min-free-disk = 1048576\nlog-format = "json"\n')
    config = load_config(toml, {"quiet_seconds": 1.0, "allow": None})
    assert config.ae_title == "EDGE1" and config.quiet_seconds == 1.0
    assert (config.max_instance_bytes, config.min_free_disk, config.log_format) == (2 << 20, 1 << 20, "json")
    assert config.allow == [Peer("PACS", "127.0.0.1"), Peer("WS")]
    assert config.destination == [Destination("PACS", "127.0.0.1", 4242)]
    assert config.admits("WS", "10.1.2.3") and not config.admits("PACS", "10.1.2.3")
    assert load_config(None, {"model": serve_model}).admits("ANY", "127.0.0.1")  # default: loopback only
    assert not load_config(None, {"model": serve_model}).admits("ANY", "10.1.2.3")
    toml.write_text('model = "m.onnx"\ncolour = "red"\n')
    with pytest.raises(CtedgeError, match="unknown option.*colour"):
        load_config(toml, {})


@pytest.mark.parametrize("args, message", [
    (["--destination", "PACS@host"], "--destination must be AET@HOST:PORT, not 'PACS@host'"),
    (["--allow", "A-TITLE-LONGER-THAN-16"], "--allow 'A-TITLE-LONGER-THAN-16' is not an AE title"),
    (["--quiet-seconds", "-1"], "--quiet-seconds must be 0 or more"),
    (["--min-free-disk", "lots"], "--min-free-disk must be a size"),
    (["--tls-cert", "x.pem"], "--tls-cert needs both --tls-cert and --tls-key"),
    (["--keep-days", "0"], "--keep-days must be more than 0"),
    (["--max-spool", "lots"], "--max-spool must be a size"),
    (["--destination-tls-cert", "x.pem"], "--destination-tls-cert needs both --destination-tls-cert and "
                                          "--destination-tls-key"),
    (["--tls-ca", "ca.pem"], "--tls-ca checks senders' certificates on DICOM TLS, which needs --tls-cert and "
                             "--tls-key too (without them the node would speak plain DICOM)"),
    (["--max-associations", "4", "--max-associations-per-host", "5"],
     "--max-associations-per-host must be 1 to --max-associations (4), not 5"),
    (["--associate-seconds", "0"], "--associate-seconds must be more than 0"),
    (["--max-instance-bytes", "lots"], "--max-instance-bytes must be a size"),
])
def test_bad_options_exit_2_naming_them(serve_model, args, message):
    result = CliRunner().invoke(app, ["serve", str(serve_model), *args])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert message in " ".join(result.output.split())


def test_help_shows_an_orthanc_snippet():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"TERMINAL_WIDTH": "400", "COLUMNS": "400"})
    assert '"DicomModalities": { "ctedge": ["CTEDGE", "EDGE-BOX-IP", 11112] }' in result.output


def test_a_destination_that_never_answers_is_tried_with_backoff_then_marked_failed(tmp_path):
    """A destination that takes the connection and never answers the A-ASSOCIATE-RQ: a real SR
    is offered ``retries`` times, with growing waits, then its delivery is ``failed`` (kept,
    with its error, tried again every ``retry_failed_every``)."""
    journal = Journal(tmp_path / "journal.sqlite", Faults())
    silent = socket.socket()  # the kernel accepts the connection; nothing ever answers on it
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    nobody = Destination("NOBODY", "127.0.0.1", silent.getsockname()[1])
    commit_sr(journal, str(nobody))
    outbox = Outbox(journal, [nobody], "CTEDGE", retries=3, retry_seconds=0.1, retry_failed_every=3600,
                    pause=Pause(), faults=Faults(), timeout=0.2)
    tries, steps = [], 0  # (before, after, next_try) around each step that made an attempt
    while journal.value("SELECT status FROM deliveries") != "failed":
        before = time.time()
        wait = outbox.step()
        after, steps = time.time(), steps + 1
        made, next_try = journal.rows("SELECT attempts, next_try FROM deliveries")[0]
        if made > len(tries):
            tries.append((before, after, next_try))
        time.sleep(max(wait, 0))
        assert steps < 500
    silent.setblocking(False)
    connections = 0
    with contextlib.suppress(BlockingIOError):
        while silent.accept():
            connections += 1
    silent.close()
    status, attempts, error = journal.rows("SELECT status, attempts, last_error FROM deliveries")[0]
    assert (status, attempts, connections) == ("failed", 3, 3)  # every attempt reached the destination
    assert error == "association failed (no answer or no connection)"
    for (before, after, next_try), backoff in zip(tries, (0.1, 0.2, 3600), strict=True):
        assert before + backoff <= next_try <= after + backoff  # doubling, then the slow retry


def commit_sr(journal, destination: str) -> None:
    """A small real SR committed as answer v1 of a study, to one destination."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = Comprehensive3DSRStorage, generate_uid(), generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    journal.add_instance(NewInstance(ds.StudyInstanceUID, "1.2.3", "1.2", "a.dcm", 10, None, "assoc"), "key")
    journal.commit_answer(journal.study(ds.StudyInstanceUID), AnswerDraft(
        1, "COMPLETE", None, {}, None, buffer.getvalue(), ds.SOPInstanceUID, None, None, 0.0), [destination])


def test_without_the_serve_extra_one_line_names_it(serve_model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    result = CliRunner().invoke(app, ["serve", str(serve_model)])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "pip install 'ctedge[serve]'" in " ".join(result.output.split())


def test_logged_messages_hash_uids():
    from ctedge.edge.serve.spool import hash_uids, uid_hash

    message = "no axial CT series found (1.2.826.0.1.3680043.10.1.5: LOCALIZER); 0.5 mm gap at 1.5"
    assert hash_uids(message) == (f"no axial CT series found (uid:{uid_hash('1.2.826.0.1.3680043.10.1.5')}: "
                                  "LOCALIZER); 0.5 mm gap at 1.5")
