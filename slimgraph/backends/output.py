"""Output paths: refuse one that cannot be written before any work is done, and write atomically.

`check_writable` runs before a model is loaded (the CLI calls it through the backend's
`check_output`), so a bad `-o` costs the user no export or calibration time. `publish`
moves a staged file into place with the mode a plain `open()` would have given it: some
writers (safetensors) stage through `mkstemp`, whose files are private (0600).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from slimgraph.errors import SlimgraphError


def check_writable(path: Path, *, folder: bool) -> None:
    """`path` can be created as a file (or a folder): nothing of the other kind stands in the
    way, every existing ancestor is a folder, and the nearest one is writable (an existing
    file there must be writable too, or replaceable)."""
    if folder and path.exists() and not path.is_dir():
        raise SlimgraphError(f"{path} is a file; this backend writes a folder there")
    if not folder and path.is_dir():
        raise SlimgraphError(f"{path} is a folder; give a file name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SlimgraphError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlimgraphError(f"cannot write {path}: no permission to write in {ancestor}")
    try:  # permissions are not the whole story (/proc, a read-only mount, a full quota): try it
        tempfile.TemporaryDirectory(prefix=".slimgraph-probe-", dir=ancestor).cleanup()
    except OSError as exc:
        raise SlimgraphError(f"cannot write {path}: {ancestor} takes no new files ({exc.strerror or exc})") from None
    if folder and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise SlimgraphError(f"cannot write {path}: no permission to write in it")


def default_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(staged: Path, target: Path) -> None:
    """Rename a staged file over `target`, with the mode a new file would get."""
    os.chmod(staged, default_mode())
    os.replace(staged, target)
