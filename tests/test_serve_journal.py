"""The spool and its journal without a running node: one process per spool, the old layout,
orphans, the order deliveries go out in, retention."""

from __future__ import annotations

import os
import socket

import pytest
from typer.testing import CliRunner

from ctedge.cli import app
from ctedge.core.errors import CtedgeError, ExitCode
from ctedge.edge.serve.disk import Pause
from ctedge.edge.serve.journal import AnswerDraft
from ctedge.edge.serve.retention import Retention
from ctedge.edge.serve.spool import Incoming, Spool, Stored
from serve_fixtures import free_port, serve_model

__all__ = ["serve_model"]


def _spool(root) -> Spool:
    return Spool(root, max_study_instances=100, min_free_disk=0, pause=Pause())


def _receive(spool: Spool, study_uid: str, count: int, association: str = "a1", first: int = 1) -> None:
    """``count`` instances of 1000 bytes, numbered from ``first``, in one association (released)."""
    for number in range(first, first + count):
        incoming = Incoming(study_uid, f"{study_uid}.{number}", f"{study_uid}.9", None, b"\0" * 1000)
        assert spool.store(incoming, association) is Stored.STORED
    spool.association_closed(association, "released")


def _answer(spool: Spool, study_uid: str, destinations=("PACS@127.0.0.1:104",)) -> int:
    study = spool.journal.study(study_uid)
    draft = AnswerDraft(study.instances, "COMPLETE", None, {}, None, b"sr", "1.2.3", None, None, 0.0)
    return spool.journal.commit_answer(study, draft, list(destinations))


def test_one_spool_one_process(tmp_path, serve_model, monkeypatch):
    """A second node on a spool in use: exit 2 naming the holder (pid, host); the spool is free
    again once the first closes it."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("a second node started"))
    first = _spool(tmp_path / "spool")
    try:
        with pytest.raises(CtedgeError, match=f"in use by another `ctedge serve` \\(pid {os.getpid()} on "
                                              f"{socket.gethostname()}\\)"):
            _spool(tmp_path / "spool")
        result = CliRunner().invoke(app, ["serve", str(serve_model), "--spool", str(tmp_path / "spool"),
                                          "--dicom-port", str(free_port()), "--http-port", str(free_port())])
        assert result.exit_code == ExitCode.BAD_INPUT and "--spool" in result.output
        assert f"pid {os.getpid()}" in " ".join(result.output.split())
    finally:
        first.close()
    _spool(tmp_path / "spool").close()


def test_a_spool_of_the_old_layout_is_refused_with_a_clear_message(tmp_path):
    (tmp_path / "spool" / "outbox").mkdir(parents=True)
    with pytest.raises(CtedgeError, match="spool of an older ctedge .* move it aside"):
        _spool(tmp_path / "spool")


def test_files_the_journal_does_not_list_are_orphans_removed_at_start(tmp_path):
    """Left by a kill -9 between a write and its commit: a stray file in a study's folder, a
    folder with no study row, a temp file. The journal's files stay; nothing is read from names."""
    spool = _spool(tmp_path / "spool")
    _receive(spool, "1.2.3", 3)
    key = spool.journal.study_key("1.2.3")
    spool.close()
    studies = tmp_path / "spool" / "studies"
    (studies / key / "f00.dcm").write_bytes(b"x")
    (studies / key / ".f01.dcm.123.tmp").write_bytes(b"x")
    (studies / ("0" * 32)).mkdir()
    (studies / ("0" * 32) / "f02.dcm").write_bytes(b"x")
    spool = _spool(tmp_path / "spool")
    try:
        assert [p.name for p in studies.iterdir()] == [key]
        assert sorted(p.name for p in (studies / key).iterdir()) == sorted(spool.journal.instance_files()[key])
        assert spool.journal.study("1.2.3").instances == 3
    finally:
        spool.close()


def test_results_of_one_study_go_out_in_version_order(tmp_path):
    """v2 waits while v1 is unsent to the same destination (another destination does not wait)."""
    spool = _spool(tmp_path / "spool")
    try:
        journal = spool.journal
        _receive(spool, "1.2.3", 2)
        _answer(spool, "1.2.3", ["A@h:1", "B@h:2"])
        _receive(spool, "1.2.3", 1, association="a2", first=3)
        _answer(spool, "1.2.3", ["A@h:1", "B@h:2"])
        due = [(d.version, d.destination) for d in journal.due_deliveries(now=1e12)]
        assert due == [(1, "A@h:1"), (1, "B@h:2")]
        first_a = journal.due_deliveries(now=1e12)[0]
        journal.delivery_sent(first_a.id)
        assert [(d.version, d.destination) for d in journal.due_deliveries(now=1e12)] == [(1, "B@h:2"), (2, "A@h:1")]
    finally:
        spool.close()


def test_retention_deletes_only_answered_and_delivered_studies_oldest_first(tmp_path):
    """--max-spool: the oldest finished studies go (rows and folder) until the spool fits; a study
    whose result is unsent, or one without an answer, stays however old or large."""
    spool = _spool(tmp_path / "spool")
    try:
        journal = spool.journal
        for uid in ("1.1", "1.2", "1.3", "1.4"):
            _receive(spool, uid, 2, association=f"a{uid}")
        for uid in ("1.1", "1.2", "1.3"):
            _answer(spool, uid)
        for (delivery_id,) in journal.rows("SELECT d.id FROM deliveries d JOIN answers a ON a.id=d.answer_id "
                                           "JOIN studies s ON s.id=a.study_id WHERE s.study_uid IN ('1.1', '1.3')"):
            journal.delivery_sent(delivery_id)
        keys = {uid: journal.study_key(uid) for uid in ("1.1", "1.2", "1.3", "1.4")}
        Retention(spool, keep_days=None, max_spool=6000, every=1).step()  # 8000 bytes held
        assert journal.study("1.1") is None and not spool.folder(keys["1.1"]).exists()
        assert all(journal.study(uid) for uid in ("1.2", "1.3", "1.4"))  # 1.3 is finished, but it fits now
        Retention(spool, keep_days=1e-9, max_spool=None, every=1).step()
        assert [uid for uid in keys if journal.study(uid)] == ["1.2", "1.4"]  # unsent, unanswered
        assert sorted(p.name for p in (tmp_path / "spool" / "studies").iterdir()) == sorted(
            [keys["1.2"], keys["1.4"]])
    finally:
        spool.close()
