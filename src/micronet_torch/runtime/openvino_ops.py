"""The former name of ``micronet_torch.kernels.openvino_ops``: importing it gives that very module."""

import sys

from ..kernels import openvino_ops

sys.modules[__name__] = openvino_ops
