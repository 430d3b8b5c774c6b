"""What a command cost this machine: peak resident memory, and bytes read and written.

- peak RSS: this process's high-water mark (Linux `VmHWM`; elsewhere `ru_maxrss`), and the
  largest of its finished child processes (the torch export runs in one:
  `slimgraph.frontend.export_worker`);
- read: what the process read from files and pipes (`rchar` of `/proc/self/io`), plus the
  weight bytes it read through memory maps, which `rchar` does not see: the slices of
  safetensors files that lazy capture reads (`count_mapped_read`, called by
  `slimgraph.frontend.lazy_weights`);
- written: what it wrote (`wchar`), the output and its external data included.

Where `/proc/self/io` is missing (not Linux), read and written are None.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

_mapped_read = 0


def count_mapped_read(nbytes: int) -> None:
    """Note `nbytes` read from a memory-mapped file."""
    global _mapped_read
    _mapped_read += nbytes


@dataclass(frozen=True)
class ProcessCost:
    peak_rss: int  # bytes
    child_peak_rss: int  # bytes; 0: no child process finished
    read: int | None
    written: int | None

    @classmethod
    def now(cls) -> ProcessCost:
        """The cost so far of this process's life."""
        io = _proc_io()
        return cls(_peak_rss(), _max_rss_bytes(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
                   None if io is None else io["rchar"] + _mapped_read,
                   None if io is None else io["wchar"])

    def to_json(self) -> dict:
        return {"peak_rss_bytes": self.peak_rss, "child_peak_rss_bytes": self.child_peak_rss,
                "read_bytes": self.read, "written_bytes": self.written}


def current_rss() -> int | None:
    """This process's resident memory now (Linux `VmRSS`); None where it cannot be read."""
    try:
        match = re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _peak_rss() -> int:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    return _max_rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _max_rss_bytes(value: int) -> int:
    return value if sys.platform == "darwin" else value * 1024  # (kilobytes on Linux, bytes on macOS)


def _proc_io() -> dict[str, int] | None:
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return {key: int(value) for key, value in (line.split(": ") for line in text.splitlines())}
