"""Location: a folder of a deployment's data dir in any filesystem pyarrow.fs opens.

A plain path is a folder on the local filesystem; a URI (``s3://bucket/prefix``, ``gs://``,
``hdfs://``, ``file://``) opens through ``pyarrow.fs.FileSystem.from_uri``; a
``pyarrow.fs.FileSystem`` object (a ``SubTreeFileSystem``, the in-memory ``_MockFileSystem``)
is used as it is, from its root. Locations pickle, so a shard actor restarted on another node
of a Ray cluster finds the same files. ``local`` is the OS path where the filesystem is the
local one (possibly under a SubTreeFileSystem): there the write-ahead log appends and fsyncs
files; elsewhere it writes whole objects (datastore/wal.py).
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import uuid

import pyarrow.fs as pafs
from monim.datastore.snapshot import _fsync, _local_path, resolve


@dataclasses.dataclass(frozen=True)
class Location:
    filesystem: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, where) -> Location:
        """A path, URI, pyarrow FileSystem or Location -> Location."""
        if isinstance(where, Location):
            return where
        if isinstance(where, pafs.FileSystem):
            return cls(where, "")
        return cls(*resolve(os.fspath(where)))

    @property
    def local(self) -> str | None:
        return _local_path(self.filesystem, self.path)

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, posixpath.join(self.path, name) if self.path else name)

    def __str__(self) -> str:
        return self.local or f"{self.filesystem.type_name}:{self.path or '/'}"

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def names(self, suffix: str = "") -> list[str]:
        """Names in this folder ending with suffix, sorted ([] when the folder does not exist)."""
        found = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(posixpath.basename(info.path) for info in found if info.base_name.endswith(suffix))

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def make_dir(self) -> None:
        if self.path:  # "" is a filesystem's root, which exists
            self.filesystem.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def write_bytes(self, data: bytes) -> None:
        """Replaces the file with data, whole or not at all: a temporary file, fsynced, then renamed
        (locally); one object upload elsewhere (object stores publish an object whole)."""
        parent = Location(self.filesystem, posixpath.dirname(self.path))
        parent.make_dir()
        if self.local is None:
            with self.filesystem.open_output_stream(self.path) as stream:
                stream.write(data)
            return
        temporary = f"{self.local}.{uuid.uuid4().hex[:8]}.tmp"
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.local)
        _fsync(parent.local)

    def delete(self) -> None:
        """Deletes the file (or the folder and everything in it); nothing if it is not there."""
        info = self.filesystem.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif info.type != pafs.FileType.NotFound:
            self.filesystem.delete_file(self.path)
