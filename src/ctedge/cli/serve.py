"""`ctedge serve`: the DICOM node and the HTTP API in one process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ctedge.cli.common import PrecisionOpt, RuleOpt, Threads, command
from ctedge.core.choices import LogFormat
from ctedge.core.errors import CtedgeError
from ctedge.edge.engines import Provider, Runtime

log = logging.getLogger("ctedge.serve")


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text, show_default=False)


# The journal's options (issue 25): one alias each, so that `serve` stays short.
IncompleteSeconds = Annotated[Optional[float], _opt(
    "A study that may be incomplete (aborted or interrupted transfer, a gap, fewer instances than "
    "ImagesInAcquisition) waits this long for more, then is answered PARTIAL [600].")]
NoPartial = Annotated[Optional[bool], typer.Option(
    "--no-partial", help="No answer at all for a study still incomplete after --incomplete-seconds.",
    show_default=False)]
RetryFailedEvery = Annotated[Optional[float], _opt(
    "A result not sent after its quick retries is tried again this often, until sent [600].")]
KeepDays = Annotated[Optional[float], _opt("Delete answered and delivered studies older than this [keep all].")]
MaxSpool = Annotated[Optional[str], _opt(
    "Delete the oldest answered and delivered studies while the spool is over this size, e.g. 50G [no limit].")]
DestinationTlsCa = Annotated[Optional[Path], _opt("TLS to destinations: CA their certificates must chain to (PEM).")]
DestinationTlsCert = Annotated[Optional[Path], _opt(
    "TLS to destinations: the node's client certificate (PEM), for destinations that ask for one.")]
DestinationTlsKey = Annotated[Optional[Path], _opt("TLS to destinations: its private key (PEM).")]
# what a peer may make the node hold, how it stops, how it logs
MaxAssociations = Annotated[Optional[int], _opt("DICOM associations open at once [16]; more are rejected "
                                                "(transient, local limit exceeded).")]
MaxPerHost = Annotated[Optional[int], _opt("Of those, from one host [half of --max-associations].")]
AssociateSeconds = Annotated[Optional[float], _opt("A connection must have negotiated its association (TLS "
                                                   "included) this soon, or it is dropped [5].")]
IdleSeconds = Annotated[Optional[float], _opt("An association silent this long is aborted; one PDU must arrive "
                                              "within it [30].")]
MaxInstanceBytes = Annotated[Optional[str], _opt("A larger instance gets 'out of resources' (0xA700) [256M].")]
DrainSeconds = Annotated[Optional[float], _opt("On SIGTERM, what open associations and requests get to finish "
                                               "[30].")]
LogFormatOpt = Annotated[Optional[LogFormat], _opt("Log lines on stderr: text (one line a record, ISO time) or json "
                                                   "(one object a line) [text].")]
# DICOMweb peers and poll mode (issue 26)
DicomWebToken = Annotated[Optional[str], typer.Option(
    "--dicomweb-token", envvar="CTEDGE_DICOMWEB_TOKEN", show_default=False,
    help="Bearer token for dicomweb: destinations and a dicomweb: --poll (or CTEDGE_DICOMWEB_TOKEN).")]
DicomWebUser = Annotated[Optional[str], _opt("... or basic auth: the user; the password from CTEDGE_DICOMWEB_PASSWORD.",
                                             "--dicomweb-user")]
Poll = Annotated[Optional[str], _opt("Ask this PACS for new CT studies, AET@HOST:PORT (C-FIND, C-GET: it must know "
                                     "--ae-title) or dicomweb:URL (QIDO-RS, WADO-RS), and classify them as if pushed.")]
PollEvery = Annotated[Optional[float], _opt("Seconds between two polls [60].")]
PollSince = Annotated[Optional[str], _opt("The first poll asks for StudyDate from this day, YYYYMMDD (later ones "
                                          "from the day of the last poll) [today].")]


@command
def serve(
    model: Annotated[Optional[Path], typer.Argument(help="Exported .onnx model (or `model` in --config).")] = None,
    config: Annotated[Optional[Path], _opt("TOML file with the same options (keys as the flags).")] = None,
    ae_title: Annotated[Optional[str], _opt("The node's AE title [CTEDGE].")] = None,
    host: Annotated[Optional[str], _opt("Interface both servers listen on [127.0.0.1; 0.0.0.0: all].")] = None,
    dicom_port: Annotated[Optional[int], _opt("DICOM port [11112].")] = None,
    http_port: Annotated[Optional[int], _opt("HTTP port [8080].")] = None,
    allow: Annotated[Optional[list[str]], _opt(
        "Sender allowed to store: AET or AET@HOST (repeatable) [none: loopback peers only].")] = None,
    destination: Annotated[Optional[list[str]], _opt("Where results go: AET@HOST:PORT (C-STORE) or dicomweb:URL "
                                                     "(STOW-RS) (repeatable).")] = None,
    spool: Annotated[Optional[Path], _opt("Folder for received instances, results and the outbox "
                                          "[ctedge-spool].")] = None,
    quiet_seconds: Annotated[Optional[float], _opt("A study is complete after this long without a new "
                                                   "instance [5].")] = None,
    max_study_instances: Annotated[Optional[int], _opt("Instances one study may hold; more get 'out of "
                                                       "resources' [3000].")] = None,
    min_free_disk: Annotated[Optional[str], _opt("Free disk below which C-STOREs are refused [1G].")] = None,
    tls_cert: Annotated[Optional[Path], _opt("DICOM TLS: the node's certificate (PEM).")] = None,
    tls_key: Annotated[Optional[Path], _opt("DICOM TLS: its private key (PEM).")] = None,
    tls_ca: Annotated[Optional[Path], _opt("DICOM TLS: CA that senders' certificates must chain to.")] = None,
    token: Annotated[Optional[str], typer.Option(help="HTTP token for /v1, /metrics and / (or CTEDGE_TOKEN).",
                                                 envvar="CTEDGE_TOKEN", show_default=False)] = None,
    runtime: Annotated[Optional[Runtime], _opt("Engine, as for predict [auto].")] = None,
    precision: PrecisionOpt = None,
    provider: Annotated[Optional[Provider], _opt("Device, as for predict [auto].")] = None,
    threads: Threads = None,
    max_slices: Annotated[Optional[int], _opt("Slices sampled per study at most, as predict --study [64].")] = None,
    queue_size: Annotated[Optional[int], _opt("Jobs waiting for the model at most; HTTP gets 503 beyond "
                                              "[8].")] = None,
    log_phi: Annotated[Optional[bool], typer.Option("--log-phi", help="Log patient data and UIDs unredacted (off: redacted).",
                                                    show_default=False)] = None,
    secondary_capture: Annotated[Optional[bool], typer.Option(
        "--secondary-capture", help="Also send the answer as a Secondary Capture image (probability along the "
                                    "scan axis) for viewers that show no SR.", show_default=False)] = None,
    incomplete_seconds: IncompleteSeconds = None, no_partial: NoPartial = None,
    retry_failed_every: RetryFailedEvery = None, keep_days: KeepDays = None, max_spool: MaxSpool = None,
    destination_tls_ca: DestinationTlsCa = None, destination_tls_cert: DestinationTlsCert = None,
    destination_tls_key: DestinationTlsKey = None,
    max_associations: MaxAssociations = None,
    max_associations_per_host: MaxPerHost = None,
    associate_seconds: AssociateSeconds = None,
    idle_seconds: IdleSeconds = None,
    max_instance_bytes: MaxInstanceBytes = None,
    drain_seconds: DrainSeconds = None,
    log_format: LogFormatOpt = None,
    rule: RuleOpt = None,
    dicomweb_token: DicomWebToken = None, dicomweb_user: DicomWebUser = None, poll: Poll = None,
    poll_every: PollEvery = None, poll_since: PollSince = None,
) -> None:
    """Run a DICOM node and an HTTP API with one loaded model.

    Studies sent by C-STORE or STOW-RS (POST /dicomweb/studies), or found by
    --poll, are answered after --quiet-seconds without a new instance: a DICOM
    Comprehensive SR (TID 1500) goes to each --destination. HTTP: POST
    /v1/studies, POST /v1/images, GET /v1/studies/UID (and .../fhir),
    /v1/model, /healthz, /readyz, /metrics, a status page at / and the API at /docs.

    Example: `ctedge serve exports/b3.onnx --host 0.0.0.0 --allow ORTHANC@10.0.0.5
    --destination ORTHANC@10.0.0.5:4242`

    In Orthanc's configuration: `"DicomModalities": { "ctedge": ["CTEDGE", "EDGE-BOX-IP", 11112] }`
    """
    given = dict(locals())  # every option as given (None: not given, the TOML's or the default then)
    try:
        import uvicorn  # noqa: F401  (checked here: the extra is installed)

        from ctedge.edge.serve.config import load_config
        from ctedge.edge.serve.http import create_app  # noqa: F401
    except ImportError as exc:
        raise CtedgeError(f"ctedge serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'ctedge[serve]'") from None

    overrides = {name: value.value if isinstance(value, Enum) else value for name, value in given.items()
                 if name != "config"}
    overrides["rules"] = overrides.pop("rule")
    overrides["dicomweb_password"] = os.environ.get("CTEDGE_DICOMWEB_PASSWORD")
    run_node(load_config(config, overrides))


class _HttpServer:
    """uvicorn's server, taking SIGTERM and Ctrl-C as a request to stop (it finishes the
    requests in flight) without raising the signal again once it has stopped."""

    def __init__(self, config):
        import uvicorn

        class Server(uvicorn.Server):
            stop_signal: int | None = None

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig, frame) -> None:
                self.stop_signal = sig
                super().handle_exit(sig, frame)

        self.server = Server(config)

    def run(self, sock) -> int | None:
        """Serve on ``sock`` until a signal; the signal that stopped it."""
        self.server.run(sockets=[sock])
        return self.server.stop_signal


def run_node(settings) -> None:
    """Start the node and the HTTP server on ``settings``; on SIGTERM (or Ctrl-C) stop accepting,
    let what is in flight finish (--drain-seconds), stop the loops."""
    import uvicorn

    from ctedge.edge.serve.http import create_app, listen
    from ctedge.edge.serve.logs import setup_logging
    from ctedge.edge.serve.service import Service

    setup_logging(settings.log_format, settings.log_phi)
    http_socket = listen(settings.host, settings.http_port, "http_port")  # busy ports: one line, before the model
    listen(settings.host, settings.dicom_port, "dicom_port").close()
    if settings.token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("HTTP on %s without --token: anyone who reaches the port can classify and read answers",
                    settings.host)
    service, stopped_by = Service(settings), None
    try:
        service.start()
        log.info("ctedge serve: DICOM %s@%s:%d, HTTP http://%s:%d/ ; SIGTERM or Ctrl-C stops (draining)",
                 settings.ae_title, settings.host, service.node.port, settings.host, settings.http_port)
        http = _HttpServer(uvicorn.Config(create_app(service), log_config=None, log_level="warning",
                                          access_log=False, timeout_graceful_shutdown=settings.drain_seconds))
        stopped_by = http.run(http_socket)
        log.info("stopping (%s): draining", signal.Signals(stopped_by).name if stopped_by else "server ended")
    finally:
        service.stop()
        http_socket.close()
    log.info("stopped")
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
