"""The one trainer every method shares (loop, AMP, checkpoints, resume, logging, DDP)."""
from sparkct.train.method import Method, MethodConfig  # noqa: F401
