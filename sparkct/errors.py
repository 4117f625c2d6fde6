"""The one exception for a user's mistake (a bad flag value, a missing path, a file of the wrong kind).

``sparkct`` commands print it in one line and exit with status 2 (a traceback only with ``-v``);
library callers get a ValueError they can catch. Real bugs stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = ["UserError", "TrainingDiverged", "TrainingInterrupted"]


class UserError(ValueError):
    """A mistake the user can fix; the message names the problem (and, where useful, the fix)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf: the run stopped without saving that state (the last good checkpoint
    stays). The CLI prints it in one line with exit status 1."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after its current step, with a checkpoint written. The message names
    the checkpoint and the command that resumes it; ``status`` is the shell's exit status for the signal
    (130 for SIGINT, 143 for SIGTERM). A KeyboardInterrupt, so code that lets Ctrl-C through lets it through."""

    def __init__(self, message: str, status: int = 130):
        super().__init__(message)
        self.status = status
