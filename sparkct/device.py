"""Device names a user types (``cpu``, ``cuda``, ``cuda:1``, ``auto``) -> torch.device, checked."""

from __future__ import annotations

from sparkct.errors import UserError

__all__ = ["resolve_device", "DEVICE_CHOICES_HELP"]

DEVICE_CHOICES_HELP = "cpu, cuda, cuda:N or auto (cuda when a GPU is visible, else cpu)"


def resolve_device(spec: str):
    """torch.device for `spec`; a UserError naming the problem for an unknown name or a CUDA device
    that is not there (checked before any work starts)."""
    import torch  # noqa: PLC0415 (lazy: command parsers import this module; `sparkct -h` imports no torch)

    s = str(spec).strip().lower()
    if s == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(s)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use {DEVICE_CHOICES_HELP}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"unsupported device {spec!r}: use {DEVICE_CHOICES_HELP}")
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {spec}: no CUDA device visible (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UserError(f"--device {spec}: only {n} CUDA device(s) visible (cuda:0 .. cuda:{n - 1})")
    return dev
