"""Numerical kernels (selective scan)."""

from vlmlab.ops.scan import selective_scan

__all__ = ["selective_scan"]
