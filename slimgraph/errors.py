"""Errors a user can act on.

The CLI prints a `SlimgraphError` as one line on stderr and exits with its `exit_code`
(2 for bad input, 1 for a fidelity failure); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlimgraphError(Exception):
    """A problem with the user's input: bad file, bad option, unsupported model."""

    exit_code: int = 2


class FidelityError(SlimgraphError):
    """A pass changed the model's outputs more than allowed (exact tolerance or --max-drop)."""

    exit_code = 1
