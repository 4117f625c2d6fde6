"""The one exception for a user's mistake (a bad flag value, a missing path, a file of the wrong kind).

``sparkct`` commands print it in one line and exit with status 2 (a traceback only with ``-v``);
library callers get a ValueError they can catch. Real bugs stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = ["UserError", "TrainingDiverged"]


class UserError(ValueError):
    """A mistake the user can fix; the message names the problem (and, where useful, the fix)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf: the run stopped without saving that state (the last good checkpoint
    stays). The CLI prints it in one line with exit status 1."""
