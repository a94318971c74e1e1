"""Compute kernels."""

from dis_dist.ops.selective_scan import bidirectional_selective_scan, selective_scan

__all__ = ["bidirectional_selective_scan", "selective_scan"]
