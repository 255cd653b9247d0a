"""The spec of :func:`s2d_ext.ops.invariant_linear`, in plain PyTorch (slow; tests and oracles only).

``y = x @ weight.T + bias``, computed in float32 from the float32 values of every input and rounded to
``x.dtype``. The kernels fix one summation order per output element (see
``csrc/include/s2d/invariant_linear_common.h``), which makes each row's result independent of the others;
this reference lets torch choose its order, so kernels match it to float32 rounding, not to the bit.
"""

from __future__ import annotations

import torch


def invariant_linear_reference(
    x: torch.Tensor,  # [..., K] float32 / bfloat16 / float16
    weight: torch.Tensor,  # [N, K] float32 / bfloat16 / float16
    bias: torch.Tensor | None = None,  # [N] or None
) -> torch.Tensor:
    """[..., N] of ``x.dtype``: ``x @ weight.T + bias`` in float32."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
