"""Run a torch export in a child process, so the process that waits keeps its display moving.

torch holds the GIL for minutes at a time while it exports, which stops every thread of its
process, a terminal spinner's included. `run_in_worker(job)` runs `job()` (a picklable callable:
the export cache's, which exports and writes an entry) in `python -m slimgraph.frontend.export_worker`
and waits for it without the GIL.

A child started with `subprocess` rather than `multiprocessing`: a spawned `multiprocessing` child
imports the parent's `__main__` again, which breaks a user's script that lacks a main guard.
The job goes in on stdin; what comes back on stdout is None or the exception it raised (the
child's own prints go to stderr).
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable

from slimgraph.errors import SlimgraphError


def run_in_worker(job: Callable[[], None]) -> None:
    """`job()` in a child process; its exception, if any, raised here."""
    done = subprocess.run([sys.executable, "-m", __name__], input=pickle.dumps(job), stdout=subprocess.PIPE,
                          check=False)
    try:
        error = pickle.loads(done.stdout)
    except Exception:  # it died before it could answer
        how = "was killed (out of memory?)" if done.returncode == -signal.SIGKILL else \
            f"ended with exit code {done.returncode} before it answered (its messages are above)"
        raise SlimgraphError(f"the export's worker process {how}; run without a terminal (or with --json) to "
                             "export in this process") from None
    if error is not None:
        raise error


def _main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches both: the parent stops it, quietly
    # the answer goes to the real stdout; everything else written there (Python or native code) to stderr
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = pickle.loads(sys.stdin.buffer.read())
    try:
        job()
        error = None
    except SlimgraphError as exc:
        error = exc
    except Exception:  # a bug: its traceback, as text (not every exception pickles)
        error = RuntimeError("the export failed in its worker process:\n" + traceback.format_exc())
    answer.write(pickle.dumps(error))
    answer.close()


if __name__ == "__main__":
    _main()
