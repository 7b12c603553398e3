"""Row-invariant fp32 GEMMs on the CPU: a row's result must not depend on how many rows share the call.

torch's fp32 CPU matmul (F.linear, torch.mm) picks its blocking by row count and thread count, so
a row of a verify block can round differently from the same row in a decode step, which breaks
eta = 0 exactness. oneDNN's rows do not depend on the row count once there are at least two, as
with the prepacked bf16 weights; a single row is therefore run as two (a copy), like the engine's
min_rows padding. Other dtypes and devices keep F.linear (bf16 on the CPU is oneDNN already).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def takes(x: torch.Tensor) -> bool:
    """Whether linear() routes x through oneDNN (fp32 on a CPU with oneDNN)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias), each row computed as it would be alone."""
    if not takes(x):
        return F.linear(x, weight, bias)
    single = x.shape[0] == 1
    rows = x.expand(2, -1) if single else x
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight.contiguous(), bias, "none", [], "")
    return out[:1] if single else out
