"""The library loggers ctedge keeps quiet, in the CLI and in the node alike: their lines
repeat what ctedge's own say, or name patient identifiers (pynetdicom's C-FIND
identifiers, a DICOMweb request's URL with the query's PatientID)."""

from __future__ import annotations

import logging

QUIET_LIBRARIES = {"pynetdicom": logging.CRITICAL, "highdicom": logging.WARNING, "uvicorn.access": logging.WARNING,
                   "httpx": logging.WARNING, "tf2onnx": logging.WARNING}


def quiet_libraries() -> None:
    """Set each quiet library's logger to its level."""
    for name, level in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(level)
