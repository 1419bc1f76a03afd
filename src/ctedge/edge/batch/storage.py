"""Where an archive's studies come from and where its answers go: local paths or URLs
that ``pyarrow.fs`` reads (s3://, gs://, hdfs://), else fsspec's (through pyarrow's
``FSSpecHandler``), and the output Parquet: a folder of part files.

**The Parquet is a folder** (``OUT.parquet/part-RUN-NNNNNN.parquet``): one part file per
scored batch, written whole under a hidden temporary name and then renamed, so a
reader or a resumed run never sees half a file (Parquet's footer comes last; a single
file could not take rows as the work goes). Every part carries the run's model digest
and options in its key-value metadata (``ctedge.run``); a resumed run must match them.
pandas, pyarrow.dataset, DuckDB and Ray read the folder as one table.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from ctedge.core.errors import CtedgeError
from ctedge.edge.batch.table import STUDY_SCHEMA

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RUN_KEY = b"ctedge.run"  # key-value metadata of every part file: the run's model and options
PART = re.compile(r"^part-[0-9a-f]+-\d+\.parquet$")
TEMPORARY = re.compile(r"^\.part-[0-9a-f]+-\d+\.parquet\.tmp$")


class FetchError(Exception):
    """An input that could not be brought from where it is stored (its row's error)."""


def is_url(reference: str) -> bool:
    return bool(URL.match(reference))


@functools.lru_cache(maxsize=64)
def _root_filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``scheme://host`` (made once: S3 asks for the bucket's region)."""
    try:
        return pafs.FileSystem.from_uri(root)
    except pa.ArrowInvalid:  # a scheme pyarrow lacks (memory://, http:// with aiohttp, ...): fsspec's
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(root)
        except (ImportError, ValueError) as exc:
            raise FetchError(f"no filesystem for {root} ({exc})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def filesystem(reference: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path or a URL; FetchError when no filesystem reads it."""
    if not is_url(reference):
        return pafs.LocalFileSystem(), os.path.abspath(reference)
    scheme, rest = reference.split("://", 1)
    if scheme.lower() == "file":
        return pafs.LocalFileSystem(), rest
    host, slash, path = rest.partition("/")
    try:
        fs, root = _root_filesystem(f"{scheme}://{host}")
    except OSError as exc:  # S3: the bucket's region could not be resolved
        raise FetchError(f"{scheme}://{host}: not reachable ({exc})") from None
    return fs, (root.rstrip("/") + slash + path) if path else root


def fetch(reference: str, folder: str, max_bytes: int) -> str:
    """Copy a stored file or folder into ``folder`` (within ``max_bytes`` in all, from the
    listing, before copying); the local path. FetchError names what went wrong."""
    fs, path = filesystem(reference)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FetchError("no such file or folder")
        files = ([f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if f.type == pafs.FileType.File] if info.type == pafs.FileType.Directory else [info])
        size = sum(f.size or 0 for f in files)
        if size > max_bytes:
            raise FetchError(f"{size:,} bytes is above the {max_bytes:,}-byte fetch budget; not copied")
        local = os.path.join(folder, posixpath.basename(path.rstrip("/")) or "input")
        if info.type == pafs.FileType.Directory:
            os.makedirs(local)  # copy_files makes the subfolders below it
        pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise FetchError(f"could not be read ({exc})") from None
    return local


class ParquetFolder:
    """An archive's answers: part files of ``STUDY_SCHEMA`` rows in one folder (local or URL)."""

    def __init__(self, uri: str):
        self.uri = uri
        try:
            self.fs, self.path = filesystem(uri)
        except FetchError as exc:
            raise CtedgeError(str(exc), param="parquet") from None
        self.run_id = uuid.uuid4().hex[:12]
        self.written = 0

    def _child(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def _names(self) -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise CtedgeError(f"{self.uri}: cannot be listed ({exc})", param="parquet") from None
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def prepare(self) -> None:
        """Make the folder (refusing a file), check it can be written, and remove the
        temporaries of a killed writer."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            raise CtedgeError(f"{self.uri}: is a file; the output is a folder of part files (name a new one)",
                              param="parquet")
        probe = self._child(f".probe-{self.run_id}")
        try:
            self.fs.create_dir(self.path, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"")
            self.fs.delete_file(probe)
        except OSError as exc:
            raise CtedgeError(f"{self.uri}: not writable ({exc})", param="parquet") from None
        for name in self._names():
            if TEMPORARY.match(name):
                self.fs.delete_file(self._child(name))

    def parts(self) -> list[str]:
        """The part files (what readers see: hidden and temporary files are left out)."""
        return [self._child(name) for name in self._names() if name.endswith(".parquet") and name[0] not in "._"]

    def run_info(self) -> dict[str, Any] | None:
        """The model and options the rows were scored with (None: no rows yet)."""
        parts = self.parts()
        if not parts:
            return None
        try:
            metadata = pq.read_schema(parts[0], filesystem=self.fs).metadata or {}
            return json.loads(metadata[RUN_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            raise CtedgeError(f"{parts[0]}: not a part file written by ctedge (no readable ctedge.run metadata); "
                              "move it away or use another folder", param="parquet") from None

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """Every part's rows (``columns`` of ``STUDY_SCHEMA``); a part that is not ctedge's is an error."""
        parts = self.parts()
        if not parts:
            return STUDY_SCHEMA.empty_table().select(columns or STUDY_SCHEMA.names)
        try:
            table = pads.dataset(parts, schema=STUDY_SCHEMA, format="parquet", filesystem=self.fs).to_table(
                columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise CtedgeError(f"{self.uri}: a part file is not readable as ctedge's ({exc})", param="parquet") from None
        if "input" in table.column_names and table.column("input").null_count:
            raise CtedgeError(f"{self.uri}: holds part files without an input column (not ctedge's)", param="parquet")
        return table

    def write(self, table: pa.Table) -> str:
        """One part file, written whole under a temporary name, then renamed."""
        name = f"part-{self.run_id}-{self.written:06d}.parquet"
        temporary, final = self._child(f".{name}.tmp"), self._child(name)
        with self.fs.open_output_stream(temporary) as stream:
            pq.write_table(table, stream)
        self.fs.move(temporary, final)
        self.written += 1
        return final
