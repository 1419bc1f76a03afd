"""Pulling studies from a PACS: DIMSE (C-FIND + C-GET, ``DimseSource``) or DICOMweb
(QIDO-RS + WADO-RS, ``DicomWebSource``), both bounded by ``PullOptions`` and checking
every instance against what was asked (``InstanceSink``); ``pull_studies`` classifies
what a query finds as `predict --study` classifies folders.

Needs ``ctedge[pacs]`` (pynetdicom, httpx, python-multipart); the clients import them
when made. The node's poll mode reuses the sources: ``find_studies``, ``find_series``,
``fetch_series``.
"""

from ctedge.edge.pacs.common import (
    InstanceSink,
    PullError,
    PullOptions,
    SeriesRef,
    StudyRef,
    default_query,
    parse_query,
)
from ctedge.edge.pacs.dicomweb import DicomWebSource
from ctedge.edge.pacs.dimse import DimseSource
from ctedge.edge.pacs.pull import StudySource, choose_series, pull_studies, pull_study

__all__ = ["DicomWebSource", "DimseSource", "InstanceSink", "PullError", "PullOptions", "SeriesRef", "StudyRef",
           "StudySource", "choose_series", "default_query", "parse_query", "pull_studies", "pull_study"]
