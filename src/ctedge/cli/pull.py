"""`predict --study --from-pacs / --from-dicomweb`: the options and the source they make."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ctedge.core.errors import CtedgeError

FromPacs = Annotated[Optional[str], typer.Option(
    "--from-pacs", help="--study: pull studies from this PACS, AET@HOST:PORT (C-FIND, then C-GET of the chosen "
                        "series into a temp folder, removed after), instead of PATHS.", show_default=False)]
FromDicomWeb = Annotated[Optional[str], typer.Option(
    "--from-dicomweb", help="--study: pull studies from this DICOMweb service, its base URL (QIDO-RS, then "
                            "WADO-RS of the chosen series), instead of PATHS.", show_default=False)]
Query = Annotated[Optional[list[str]], typer.Option(
    "--query", help="With --from-*: a study-level match, KEY=VALUE with a DICOM keyword (repeatable), e.g. "
                    "StudyDate=20261201-, AccessionNumber=A123, ModalitiesInStudy=CT. Given, it replaces the "
                    "default: CT studies of today.", show_default=False)]
AeTitle = Annotated[str, typer.Option("--ae-title", help="With --from-pacs: this machine's AE title (the PACS "
                                                         "must know it).")]
MaxStudies = Annotated[Optional[int], typer.Option(
    help="With --from-*: a query matching more studies is refused, nothing retrieved; narrow --query "
         "[default: 100].", show_default=False)]
DicomWebToken = Annotated[Optional[str], typer.Option(
    "--dicomweb-token", envvar="CTEDGE_DICOMWEB_TOKEN", show_default=False,
    help="With --from-dicomweb: bearer token (or CTEDGE_DICOMWEB_TOKEN, which ps does not show).")]
DicomWebUser = Annotated[Optional[str], typer.Option(
    "--dicomweb-user", show_default=False,
    help="With --from-dicomweb: basic-auth user; the password from CTEDGE_DICOMWEB_PASSWORD.")]


def pull_request(from_pacs: str | None, from_dicomweb: str | None, query: list[str] | None, *, study: bool,
                 paths: list, ae_title: str, max_studies: int | None, max_bytes: int, token: str | None,
                 user: str | None) -> tuple | None:
    """(source, query) when the flags ask to pull studies, None when PATHS are given; exit 2
    for a combination that does not make sense."""
    import os

    source = pull_source(from_pacs, from_dicomweb, ae_title=ae_title, max_studies=max_studies, max_bytes=max_bytes,
                         token=token, user=user, password=os.environ.get("CTEDGE_DICOMWEB_PASSWORD"))
    if source is not None and (paths or not study):
        raise CtedgeError("--from-pacs/--from-dicomweb pull whole studies: give --study and no PATHS")
    if not paths and source is None:
        raise CtedgeError("no PATHS given (or, with --study, --from-pacs / --from-dicomweb)")
    if source is None:
        return None
    from ctedge.edge.pacs import parse_query

    return source, parse_query(query)


def pull_source(from_pacs: str | None, from_dicomweb: str | None, *, ae_title: str, max_studies: int | None,
                max_bytes: int, token: str | None, user: str | None, password: str | None):
    """The source the flags name (None for neither), with its bounds; exit 2 for both, or for
    a missing ``[pacs]`` extra."""
    if from_pacs and from_dicomweb:
        raise CtedgeError("--from-pacs and --from-dicomweb: give one")
    if not (from_pacs or from_dicomweb):
        return None
    try:
        import httpx  # noqa: F401
        import pynetdicom  # noqa: F401
        import python_multipart  # noqa: F401
    except ImportError as exc:
        raise CtedgeError(f"pulling from a PACS needs the pacs extra ({exc.name} is missing): "
                          "pip install 'ctedge[pacs]'") from None
    from ctedge.edge.pacs import DicomWebSource, DimseSource, PullOptions

    options = PullOptions(max_bytes=max_bytes, **({} if max_studies is None else {"max_studies": max_studies}))
    if from_pacs:
        from pynetdicom import _config

        # its identifiers (PatientID) not even formatted for its (quiet: core.logs) logger
        _config.LOG_RESPONSE_IDENTIFIERS = _config.LOG_REQUEST_IDENTIFIERS = False
        return DimseSource(from_pacs, ae_title, options)
    return DicomWebSource(from_dicomweb, token=token, user=user, password=password, options=options)
