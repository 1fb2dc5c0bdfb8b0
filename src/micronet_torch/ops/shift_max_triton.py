"""The former name of ``micronet_torch.kernels.fused_triton``: importing it gives that very module."""

import sys

from ..kernels import fused_triton

sys.modules[__name__] = fused_triton
