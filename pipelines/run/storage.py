"""Moving a checkpoint directory between nodes through shared storage (a path or s3://, gs://).

On a cluster, the node that writes a pruned checkpoint (a GPU worker) is not the node that
logs it (the driver on the head) nor the ones that evaluate it. Everything therefore goes
through the run's storage path, which Ray Train already requires to be shared: a local path
on one machine or NFS, a bucket URI on a cluster. Local paths are used in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def is_uri(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def absolute(location: str) -> str:
    """A storage location with local paths made absolute (URIs untouched)."""
    if is_uri(location):
        return location
    return str(Path(location.removeprefix("file://")).expanduser().resolve())


def run_storage(storage_path: str | None) -> str:
    """Where Ray Train/Tune keep a run: the given path or URI, else $ELSA_STORAGE, else
    ./elsa-runs; absolute, as Ray requires. One default for elsa prune and elsa tune."""
    return absolute(storage_path or os.environ.get("ELSA_STORAGE", "elsa-runs"))


def holds(location: str, name: str) -> bool:
    """Whether the folder ``location`` (a path or URI) holds a file ``name``."""
    if not is_uri(location):
        return (Path(absolute(location)) / name).is_file()
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(location)
    return filesystem.get_file_info(f"{path.rstrip('/')}/{name}").type == pafs.FileType.File


def read_text(location: str, name: str) -> str | None:
    """The text of the file ``name`` in the folder ``location`` (a path or URI), or None if absent;
    one small file, without copying the folder (a checkpoint) it sits in."""
    if not holds(location, name):
        return None
    if not is_uri(location):
        return (Path(absolute(location)) / name).read_text()
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(location)
    with filesystem.open_input_stream(f"{path.rstrip('/')}/{name}") as stream:
        return stream.read().decode()


def checkpoint_uri(checkpoint) -> str:
    """The location of a ``ray.train.Checkpoint`` as a path or URI."""
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(kind, kind)
    return f"{scheme}://{checkpoint.path}"


def upload(local_dir: str | Path, location: str) -> str:
    """Copy ``local_dir`` to ``location`` (replacing it); returns the location."""
    if not is_uri(location):
        target = Path(absolute(location))
        if target.resolve() != Path(local_dir).resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(local_dir, target)
        return str(target)
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(location)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    return location


def download(location: str, local_dir: str | Path) -> Path:
    """Copy ``location`` into ``local_dir`` (a no-op when they are the same local directory)."""
    local_dir = Path(local_dir)
    if not is_uri(location):
        source = Path(absolute(location))
        if source.resolve() != local_dir.resolve():
            shutil.copytree(source, local_dir, dirs_exist_ok=True)
        return local_dir
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(location)
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def materialized(location: str):
    """A local directory holding ``location``'s files for the duration of the block."""
    if not is_uri(location):
        yield absolute(location)
        return
    scratch = tempfile.mkdtemp(prefix="elsa-ckpt-")
    try:
        yield str(download(location, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
