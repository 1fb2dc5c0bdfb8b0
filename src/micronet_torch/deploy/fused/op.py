"""The former name of ``micronet_torch.kernels.op``: importing it gives that very module."""

import sys

from ...kernels import op

sys.modules[__name__] = op
