"""Read stage for NIfTI volumes (nibabel, an optional extra): one study with one
series, within the byte and pixel budgets; an uncompressed file is read lazily (only
the sampled slices), a .nii.gz inflated once."""

from __future__ import annotations

import os
import threading
import zlib
from pathlib import Path

import numpy as np

from ctedge.core.dicom import DicomError, pixel_budget_message
from ctedge.edge.study.records import SliceRef, Study

NIFTI_EXTRA = 'pip install "ctedge[nifti]"'
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CHUNK = 16 * 2**20  # inflated at a time


class _Volume:
    """Axial slices of a NIfTI volume, oriented like a radiological axial view (rows
    anterior->posterior, columns right->left). An uncompressed file is read a slice at a
    time; a gzip stream cannot seek (each slice would inflate the file from its start), so
    a .nii.gz is inflated once, when the first slice is asked for (within the byte budget
    its header was checked against), and its slices are read from memory."""

    def __init__(self, image, path: Path, nbytes: int):
        import nibabel

        self.image, self.path, self.nbytes = image, path, nbytes
        self.inflated = not str(path).lower().endswith(".gz")
        self.lock = threading.Lock()
        ornt = nibabel.io_orientation(image.affine)  # voxel axis -> (RAS axis, flip)
        self.axis_of = {int(out): axis for axis, (out, _) in enumerate(ornt)}
        self.flip = {int(out): flip < 0 for out, flip in ornt}

    @property
    def slices(self) -> int:
        return self.image.shape[self.axis_of[2]]

    def position(self, k: int) -> float:
        voxel = np.zeros(4)
        voxel[self.axis_of[2]], voxel[3] = k, 1.0
        return float((self.image.affine @ voxel)[2])

    def _inflate(self) -> None:
        """The whole .nii.gz in memory, once, read by nibabel as a file: the same slicing
        and scaling as from the file. A truncated stream keeps what it holds (the slices
        past its end fail as they did)."""
        import gzip

        with self.lock:
            if self.inflated:
                return
            wanted, chunks = int(self.image.dataobj.offset) + self.nbytes, []
            try:
                with gzip.open(self.path, "rb") as stream:
                    while wanted > 0 and (chunk := stream.read(min(wanted, CHUNK))):
                        chunks.append(chunk)
                        wanted -= len(chunk)
            except (OSError, EOFError, zlib.error):
                pass
            self.image = type(self.image).from_bytes(b"".join(chunks))
            self.inflated = True

    def slice(self, k: int) -> np.ndarray:
        slicer: list = [slice(None)] * 3
        slicer[self.axis_of[2]] = k
        try:
            self._inflate()
            plane = np.asarray(self.image.dataobj[tuple(slicer)], dtype=np.float32)
        except Exception as exc:  # truncated or corrupt gzip/raw data: nibabel, gzip, zlib, OSError
            raise DicomError(f"cannot read NIfTI slice {k} ({exc.__class__.__name__}: {exc})") from None
        if self.axis_of[0] > self.axis_of[1]:  # plane axes in voxel order; make them (x, y)
            plane = plane.T
        plane = plane[::-1 if self.flip[0] else 1, ::-1 if self.flip[1] else 1]  # -> RAS+
        return np.ascontiguousarray(plane[::-1, ::-1].T)


def _volume_bytes(image) -> int:
    return int(np.prod(image.shape, dtype=np.float64) * image.header.get_data_dtype().itemsize)


def _volume_problem(path: Path, image, max_bytes: int, max_pixels: int) -> str | None:
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3:
        return f"expected a 3-D volume, got shape {shape}"
    if min(shape) < 1:
        return f"empty volume of shape {shape}"
    header = image.header
    nbytes = _volume_bytes(image)
    if nbytes > max_bytes:
        return (f"volume of {nbytes:,} bytes uncompressed (header: {shape} {header.get_data_dtype()}) is above "
                f"the {max_bytes:,}-byte budget (raise it with ctedge --max-bytes N); not read")
    if not str(path).lower().endswith(".gz"):
        needed = int(image.dataobj.offset) + nbytes
        size = os.path.getsize(path)
        if size < needed:
            return f"header claims {needed:,} bytes of data, the file holds {size:,} (truncated or a false header)"
    return None


def read_nifti(path: Path, max_bytes: int, max_pixels: int) -> Study:
    """A NIfTI volume as one study with one series: the axis nearest the patient's z."""
    name = str(path)
    try:
        import nibabel
    except ImportError:
        return Study(name, path.name, error=f"reading NIfTI needs nibabel: {NIFTI_EXTRA}")
    try:
        image = nibabel.load(name)
        problem = _volume_problem(path, image, max_bytes, max_pixels)
        volume = None if problem else _Volume(image, path, _volume_bytes(image))
    except Exception as exc:  # nibabel raises many types for a bad file
        return Study(name, path.name, error=f"not a readable NIfTI volume ({exc.__class__.__name__}: {exc})")
    if problem:
        return Study(name, path.name, error=problem)
    rows, cols = image.shape[volume.axis_of[1]], image.shape[volume.axis_of[0]]
    if rows * cols > max_pixels:
        return Study(name, path.name, error=pixel_budget_message(cols, rows, max_pixels))
    refs = [SliceRef(name=f"{path}#{k}", study_uid=path.name, series_uid=path.name, modality="CT",
                     image_type=("ORIGINAL", "PRIMARY", "AXIAL"), rows=rows, cols=cols, orientation=AXIAL,
                     position=(0.0, 0.0, volume.position(k)), load=lambda k=k: volume.slice(k))
              for k in range(volume.slices)]
    return Study(name, path.name, series={path.name: refs},
                 warnings=["NIfTI: voxel values taken as HU (scl_slope/scl_inter applied)"])
