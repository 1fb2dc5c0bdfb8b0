"""The former name of ``micronet_torch.kernels.fused``: importing it gives that very module."""

import sys

from ..kernels import fused

sys.modules[__name__] = fused
