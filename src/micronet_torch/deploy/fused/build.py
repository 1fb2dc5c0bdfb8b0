"""The former name of ``micronet_torch.kernels.ort_ops``: importing it gives that very module."""

import sys

from ...kernels import ort_ops

sys.modules[__name__] = ort_ops
