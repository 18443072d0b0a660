"""Checks on tensor values shared by the file readers and the subspace cache."""
from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``: min and max propagate both, in one pass (~8x faster than ``isfinite().all()``).
    One-byte floats (float8) have no min/max kernel on the CPU and are widened first."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.element_size() == 1:
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
