"""Errors a user can act on.

The CLI prints a `SlimgraphError` as one line on stderr and exits with its `exit_code`
(2 for bad input, 1 for a fidelity failure); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colours some libraries put in their messages


class SlimgraphError(Exception):
    """A problem with the user's input: bad file, bad option, unsupported model."""

    exit_code: int = 2


class FidelityError(SlimgraphError):
    """A pass changed the model's outputs more than allowed (exact tolerance or --max-drop)."""

    exit_code = 1


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-blank line of an exception's message (colour codes removed), or its type."""
    lines = [line.strip() for line in ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:limit] if limit else text
