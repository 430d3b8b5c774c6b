"""Output paths: refuse one that cannot be written before any work is done, and write atomically.

`check_writable` runs before a model is loaded (the CLI calls it through the backend's
`check_output`), so a bad `-o` costs the user no export or calibration time.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimgraph.errors import SlimgraphError


def check_writable(path: Path, *, folder: bool) -> None:
    """`path` can be created as a file (or a folder): nothing of the other kind stands in the
    way, every existing ancestor is a folder, and the nearest one is writable."""
    if folder and path.exists() and not path.is_dir():
        raise SlimgraphError(f"{path} is a file; this backend writes a folder there")
    if not folder and path.is_dir():
        raise SlimgraphError(f"{path} is a folder; give a file name")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SlimgraphError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlimgraphError(f"cannot write {path}: no permission to write in {ancestor}")
