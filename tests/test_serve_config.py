"""`ctedge serve` options: TOML and flags, and the messages for bad ones; the outbox's bounded retries."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.edge.serve.config import Destination, Peer, load_config
from ctedge.edge.serve.outbox import Outbox
from serve_fixtures import free_port, serve_model, wait_for

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


def test_outbox_retries_with_backoff_then_sets_aside(tmp_path):
    """A destination that never answers: the result is tried ``retries`` times, with growing
    waits, then moved to outbox/failed/ (kept, not lost)."""
    nobody = Destination("NOBODY", "127.0.0.1", free_port())
    outbox = Outbox(tmp_path / "outbox", [nobody], "CTEDGE", retries=3, retry_seconds=0.1)
    outbox.put("study-v1", b"DICM not even a dataset")  # never parsed: no association comes up
    started = time.monotonic()
    outbox.start()
    try:
        wait_for(lambda: (tmp_path / "outbox" / "failed" / "study-v1.dcm").exists(), what="the set-aside entry")
    finally:
        outbox.stop()
    assert time.monotonic() - started >= 0.1 + 0.2  # two backoffs between three attempts
    assert outbox.pending() == 0


def test_a_study_is_classified_during_its_quiet_period_and_sent_at_its_end(tmp_path):
    """Silent for 1 s: classify (speculatively); quiet period over and nothing new: send; a new
    instance meanwhile: classify again before anything is sent."""
    from ctedge.edge.serve.spool import SpooledStudy

    study = SpooledStudy("1.2.3", tmp_path, sop_uids={"a", "b"}, written=2, last_arrival=100.0)
    assert not study.to_classify(1.0, 100.5) and study.to_classify(1.0, 101.0)
    study.speculation = (2, "answer")
    assert not study.to_classify(1.0, 102.0)  # classified as it is
    assert not study.to_send(5.0, 104.9) and study.to_send(5.0, 105.0)
    study.sop_uids.add("c")  # arriving (being written)
    assert not study.to_send(5.0, 106.0) and not study.to_classify(1.0, 106.0)
    study.written, study.last_arrival = 3, 106.0
    assert not study.to_send(5.0, 111.0)  # the answer for 2 instances is stale
    assert study.to_classify(1.0, 107.0)
    study.speculation, study.answered_instances = (3, "answer"), 3
    assert not study.to_send(5.0, 120.0) and not study.to_classify(1.0, 120.0)  # answered


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
