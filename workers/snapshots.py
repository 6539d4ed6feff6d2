"""Deployment snapshots: every shard writes its part, the front end writes the manifest on top;
restore reads them into a deployment of any shard count.

    <location>/manifest.json              the deployment's: format, shard count, namespaces
                                          (config, next id, rows), SHA-256 of each shard manifest
    <location>/shard-<i>/manifest.json    the shard's (datastore/snapshot.py): SHA-256 of each file
    <location>/shard-<i>/<namespace>.parquet

Locations are names under the snapshot root, or paths / URIs inside it; nothing else.
Restore checks every checksum and the format before it creates anything, then creates each
namespace (a new generation), re-routes every row by this deployment's placement (ids stay),
and reserves ids past the snapshot's next id. With a data dir, every shard then takes a
snapshot of its own, so the restored rows are durable without passing through the log.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import posixpath
import time
import uuid

import pyarrow.fs as pafs
from monim.datastore import snapshot
from monim.protos.config import NamespaceConfig
from monim.protos.errors import AlreadyExists, InvalidArgument, NamespaceNotFound

FORMAT_VERSION = 1
KIND = "monim-deployment-snapshot"
EXPORT_POLL_S = 0.2


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Snapshots:
    """router: the front end's Router; root: the folder or URI snapshots live under."""

    def __init__(self, router, root: str):
        self.router = router
        self.root = root
        self.filesystem, self.root_path = snapshot.resolve(root)

    def _uri(self, path: str) -> str:
        """A path of self.filesystem as a location a shard actor can open."""
        if "://" in self.root:
            return f"{self.root.split('://', 1)[0]}://{path}"
        return path

    def locate(self, location: str) -> str:
        """The path (in self.filesystem) of a location under the root; InvalidArgument otherwise."""
        if not isinstance(location, str) or not location:
            raise InvalidArgument("a snapshot location is missing")
        if location.startswith("/") or "://" in location:
            filesystem, path = snapshot.resolve(location)
            if type(filesystem) is not type(self.filesystem):
                raise InvalidArgument(f"snapshot location {location!r} is outside the snapshot root {self.root!r}")
            path = posixpath.normpath(path)
            if path != self.root_path and not path.startswith(self.root_path.rstrip("/") + "/"):
                raise InvalidArgument(f"snapshot location {location!r} is outside the snapshot root {self.root!r}")
            return path
        return snapshot.safe_join(self.root_path, location)

    def _write_json(self, path: str, data: dict) -> bytes:
        payload = json.dumps(data, indent=1).encode()
        temporary = path + ".tmp"
        with self.filesystem.open_output_stream(temporary) as stream:
            stream.write(payload)
        self.filesystem.move(temporary, path)
        return payload

    def _read_json(self, path: str) -> tuple[dict, bytes]:
        try:
            with self.filesystem.open_input_stream(path) as stream:
                payload = stream.read()
        except (FileNotFoundError, OSError) as error:
            raise snapshot.SnapshotError(f"no snapshot at {path}: {error}") from error
        return json.loads(payload), payload

    # ----- create ------------------------------------------------------------------------
    def create(self, location: str, namespace: str = "") -> dict:
        target = self.locate(location)
        configs = [self.router.config(namespace)] if namespace else self.router.list_namespaces()
        names = [config.name for config in configs]
        if self.filesystem.get_file_info(posixpath.join(target, "manifest.json")).type != pafs.FileType.NotFound:
            raise snapshot.SnapshotError(f"snapshot location {location!r} already holds a snapshot; write each "
                                         "snapshot to a new location")
        self.filesystem.create_dir(target, recursive=True)
        shard_dirs = [posixpath.join(target, f"shard-{i}") for i in range(self.router.num_shards)]
        job = uuid.uuid4().hex  # one per call: a round sent again is the same export, a new call is not
        exports = [(self._uri(shard_dirs[i]), names, job) for i in range(self.router.num_shards)]
        jobs = self.router._call([(i, "export_snapshot", exports[i]) for i in range(self.router.num_shards)])
        manifests = self._wait_for_exports(jobs, exports)
        namespaces = {}
        for config in configs:
            rows = sum(m["namespaces"].get(config.name, {}).get("rows", 0) for m in manifests)
            next_id = self.router.runtime.call_registry("next_id", config.name)
            namespaces[config.name] = {"config": config.to_dict(), "next_id": next_id, "rows": rows}
        shards = []
        for directory in shard_dirs:
            _, payload = self._read_json(posixpath.join(directory, "manifest.json"))
            shards.append({"dir": posixpath.basename(directory), "manifest_sha256": hashlib.sha256(payload).hexdigest()})
        total = sum(entry.get("bytes", 0) for m in manifests for entry in m["namespaces"].values())
        manifest = {"format_version": FORMAT_VERSION, "kind": KIND, "created_at": _now(),
                    "num_shards": self.router.num_shards, "namespaces": namespaces, "shards": shards, "bytes": total}
        self._write_json(posixpath.join(target, "manifest.json"), manifest)
        return self._info(location, manifest)

    def _wait_for_exports(self, jobs: list[str], exports: list[tuple]) -> list[dict]:
        """Polls every shard's export until all are written (the shards serve meanwhile), within the
        call's deadline. A shard that restarted meanwhile has lost its export (it answers "no
        snapshot export"): it is asked for it again, and exports what it holds then."""
        manifests: dict[int, dict] = {}
        while len(manifests) < len(jobs):
            for shard in [shard for shard in range(len(jobs)) if shard not in manifests]:
                try:
                    answer = self.router._call([(shard, "export_status", (jobs[shard],))])[0]
                except InvalidArgument as error:
                    if "no snapshot export" not in error.message:
                        raise
                    written = snapshot.resolve(exports[shard][0])
                    if written[0].get_file_info(posixpath.join(written[1], "manifest.json")).type == pafs.FileType.File:
                        manifests[shard] = snapshot.read_manifest(*written)  # it finished before the restart
                    else:
                        jobs[shard] = self.router._call([(shard, "export_snapshot", exports[shard])])[0]
                    continue
                if answer is not None:
                    manifests[shard] = answer
            if len(manifests) < len(jobs):
                time.sleep(EXPORT_POLL_S)
        return [manifests[shard] for shard in range(len(jobs))]

    @staticmethod
    def _info(location: str, manifest: dict) -> dict:
        return {"location": location, "created_at": manifest["created_at"], "shards": manifest["num_shards"],
                "rows": {name: entry["rows"] for name, entry in manifest["namespaces"].items()},
                "bytes": manifest.get("bytes", 0)}

    def list(self) -> list[dict]:
        """The snapshots directly under the root (those with a deployment manifest), oldest first."""
        try:
            entries = self.filesystem.get_file_info(pafs.FileSelector(self.root_path, allow_not_found=True))
        except OSError:
            return []
        found = []
        for entry in entries:
            if entry.type != pafs.FileType.Directory:
                continue
            try:
                manifest, _ = self._read_json(posixpath.join(entry.path, "manifest.json"))
            except (snapshot.SnapshotError, ValueError):
                continue
            if manifest.get("kind") == KIND:
                found.append(self._info(entry.base_name, manifest))
        return sorted(found, key=lambda info: info["created_at"])

    # ----- restore -----------------------------------------------------------------------
    def _verified(self, source: str, namespace: str) -> tuple[dict, list[tuple[str, dict]]]:
        """The deployment manifest and [(shard dir, shard manifest)], every checksum checked."""
        manifest, _ = self._read_json(posixpath.join(source, "manifest.json"))
        if manifest.get("kind") != KIND:
            raise snapshot.SnapshotError(f"{source} is not a monim deployment snapshot")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise snapshot.SnapshotError(f"snapshot {source} has format version {manifest['format_version']}; "
                                         f"this monim reads up to {FORMAT_VERSION}; nothing was loaded")
        if namespace and namespace not in manifest["namespaces"]:
            raise NamespaceNotFound(namespace)
        shards = []
        for entry in manifest["shards"]:
            directory = snapshot.safe_join(source, entry["dir"])
            _, payload = self._read_json(posixpath.join(directory, "manifest.json"))
            if hashlib.sha256(payload).hexdigest() != entry["manifest_sha256"]:
                raise snapshot.SnapshotError(f"{directory}/manifest.json does not match its checksum; "
                                             "nothing was loaded")
            shard_manifest = snapshot.read_manifest(self.filesystem, directory)
            for name, item in shard_manifest["namespaces"].items():
                if not namespace or name == namespace:  # reads every byte once: a bad file is found now
                    snapshot.read_namespace_rows(self.filesystem, directory, item)
            shards.append((directory, shard_manifest))
        return manifest, shards

    def restore(self, location: str, namespace: str = "") -> dict[str, int]:
        source = self.locate(location)
        manifest, shards = self._verified(source, namespace)
        names = [namespace] if namespace else sorted(manifest["namespaces"])
        existing = {config.name for config in self.router.list_namespaces()}
        taken = [name for name in names if name in existing]
        if taken:
            raise AlreadyExists(f"namespace(s) {taken} already exist in this deployment; drop them first "
                                "(nothing was restored)")
        restored = {}
        for name in names:
            entry = manifest["namespaces"][name]
            config = self.router.create_namespace(NamespaceConfig.from_dict(dict(entry["config"], generation=0)))
            rows = 0
            for directory, shard_manifest in shards:
                item = shard_manifest["namespaces"].get(name)
                if item is None:
                    continue
                table = snapshot.read_namespace_rows(self.filesystem, directory, item, verify=False)
                parts = snapshot.split_rows(table, self.router.num_shards)
                calls = [(shard, "restore_rows", (name, config.generation, part))
                         for shard, part in enumerate(parts) if part.num_rows]
                rows += sum(self.router._call(calls)) if calls else 0
            self.router.runtime.call_registry("reserve_ids", name, entry["next_id"])
            restored[name] = rows
        self.router._all_shards("snapshot")  # durable now (no-op on an ephemeral deployment)
        return restored
