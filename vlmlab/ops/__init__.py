"""Numerical kernels (selective scan)."""

from vlmlab.ops.scan import available_backends, selective_scan, use_backend

__all__ = ["available_backends", "selective_scan", "use_backend"]
