"""Float weights (fp32/fp16/bf16): scaling rows or columns, computed in float32, cast back, overflow refused."""

from __future__ import annotations

import torch

from ..errors import TargetError


def scale(weight: torch.Tensor, vector: torch.Tensor, rows: bool, where: str) -> torch.Tensor:
    """``weight`` with its rows (``rows=True``) or columns multiplied by ``vector``, in ``weight``'s dtype.

    The product is formed in float32 and checked for infinities after the cast to the storage dtype (an
    fp16 weight can overflow where the float32 product does not).
    """
    factor = vector.to(weight.device, torch.float32)
    factor = factor.reshape(-1, 1) if rows else factor.reshape(1, -1)
    result = (weight.float() * factor).to(weight.dtype)
    if not torch.isfinite(result).all() and torch.isfinite(weight).all():
        raise TargetError(f"{where}: merged values overflow {str(weight.dtype).removeprefix('torch.')}",
                          hint="the adapter's scales are too large for this storage; write --dtype float32")
    return result
