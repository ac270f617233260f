"""The search's own record, beside Ray Tune's experiment state: what to resume and how.

Why: Ray Tune restores its trials and searcher from the experiment directory, but a search here is
more than one Tuner: one per sparsity, each with an MLflow parent run, plus the request that
started it (model, budget, space, search settings). Keeping that in ``<storage>/<name>/search.json``
means ``elsa tune --name N --storage-path P --resume`` needs nothing else, and the resumed search
cannot silently differ from the interrupted one. Works on local paths and on any URI pyarrow can
open (s3://, gs://), like Ray's own storage.
"""

from __future__ import annotations

import json


STATE_FILE = "search.json"


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _filesystem(path: str):
    from pyarrow import fs

    if "://" in path:
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), path


def read(root: str) -> dict | None:
    """The saved state of the search rooted at ``root``, or None when there is none."""
    from pyarrow import fs

    filesystem, path = _filesystem(join(root, STATE_FILE))
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def write(root: str, state: dict) -> None:
    filesystem, path = _filesystem(join(root, STATE_FILE))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(state, indent=1, default=str).encode())
