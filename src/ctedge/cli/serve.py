"""`ctedge serve`: the DICOM node and the HTTP API in one process."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from ctedge.cli.common import PrecisionOpt, RuleOpt, Threads, command
from ctedge.core.errors import CtedgeError
from ctedge.core.progress import console
from ctedge.edge.engines import Provider, Runtime

SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)B?$", re.IGNORECASE)


def parse_size(text: str | None, param: str) -> int | None:
    """'2G', '500M', '1048576' -> bytes."""
    if text is None:
        return None
    match = SIZE.match(str(text).strip())
    if not match:
        raise CtedgeError(f"must be a size such as 2G, 500M or 1048576, not {text!r}", param=param)
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def _opt(help_text: str, *names: str):
    return typer.Option(*names, help=help_text, show_default=False)


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
    destination: Annotated[Optional[list[str]], _opt("Where results go: AET@HOST:PORT (repeatable).")] = None,
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
    token: Annotated[Optional[str], typer.Option(help="HTTP bearer token for /v1 (or CTEDGE_TOKEN).",
                                                 envvar="CTEDGE_TOKEN", show_default=False)] = None,
    runtime: Annotated[Optional[Runtime], _opt("Engine, as for predict [auto].")] = None,
    precision: PrecisionOpt = None,
    provider: Annotated[Optional[Provider], _opt("Device, as for predict [auto].")] = None,
    threads: Threads = None,
    max_slices: Annotated[Optional[int], _opt("Slices sampled per study at most, as predict --study [64].")] = None,
    queue_size: Annotated[Optional[int], _opt("Jobs waiting for the model at most; HTTP gets 503 beyond "
                                              "[8].")] = None,
    log_phi: Annotated[Optional[bool], typer.Option("--log-phi", help="Log PatientID (off: hashed UIDs only).",
                                                    show_default=False)] = None,
    secondary_capture: Annotated[Optional[bool], typer.Option(
        "--secondary-capture", help="Also send the answer as a Secondary Capture image (probability along the "
                                    "scan axis) for viewers that show no SR.", show_default=False)] = None,
    rule: RuleOpt = None,
) -> None:
    """Run a DICOM node and an HTTP API with one loaded model.

    Studies sent by C-STORE are answered after --quiet-seconds without a new
    instance: a DICOM Comprehensive SR (TID 1500) goes to each --destination.
    HTTP: POST /v1/studies, POST /v1/images, GET /v1/studies/UID, /v1/model,
    /healthz, /readyz, /metrics, a status page at / and the API at /docs.

    Example: `ctedge serve exports/b3.onnx --host 0.0.0.0 --allow ORTHANC@10.0.0.5
    --destination ORTHANC@10.0.0.5:4242`

    In Orthanc's configuration: `"DicomModalities": { "ctedge": ["CTEDGE", "EDGE-BOX-IP", 11112] }`
    """
    try:
        import uvicorn  # noqa: F401  (checked here: the extra is installed)

        from ctedge.edge.serve.config import load_config
        from ctedge.edge.serve.http import create_app  # noqa: F401
    except ImportError as exc:
        raise CtedgeError(f"ctedge serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'ctedge[serve]'") from None

    overrides = dict(model=model, ae_title=ae_title, host=host, dicom_port=dicom_port, http_port=http_port,
                     allow=allow, destination=destination, spool=spool, quiet_seconds=quiet_seconds,
                     max_study_instances=max_study_instances, min_free_disk=parse_size(min_free_disk, "min_free_disk"),
                     tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca, token=token,
                     runtime=runtime.value if runtime else None, precision=precision.value if precision else None,
                     provider=provider.value if provider else None, threads=threads, max_slices=max_slices,
                     queue_size=queue_size, log_phi=log_phi, secondary_capture=secondary_capture, rules=rule)
    run_node(load_config(config, overrides))


def run_node(settings) -> None:
    """Start the node and the HTTP server on ``settings``; stop both on the way out."""
    import logging

    import uvicorn

    from ctedge.edge.serve.http import create_app
    from ctedge.edge.serve.service import Service

    # their lines repeat ours (which say why) or name instance UIDs
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    if settings.token is None and settings.host not in ("127.0.0.1", "::1", "localhost"):
        logging.getLogger("ctedge.serve").warning(
            "HTTP on %s without --token: anyone who reaches the port can classify and read answers", settings.host)
    service = Service(settings)
    service.start()
    console.print(f"ctedge serve: DICOM {settings.ae_title}@{settings.host}:{service.node.port}, "
                  f"HTTP http://{settings.host}:{settings.http_port}/ ; Ctrl-C stops", highlight=False)
    try:
        uvicorn.run(create_app(service), host=settings.host, port=settings.http_port, log_level="warning")
    finally:
        service.stop()
