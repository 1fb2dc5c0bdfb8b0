"""The former name of ``micronet_torch.kernels.executorch_ops``: importing it gives that very module."""

import sys

from ..kernels import executorch_ops

sys.modules[__name__] = executorch_ops
