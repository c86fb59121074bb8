from __future__ import annotations

import torch
from torch import nn

from .. import kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up on the output of the merged gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_mul(x)
