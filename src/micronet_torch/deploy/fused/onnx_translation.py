"""The former name of ``micronet_torch.kernels.onnx_translation``: importing it gives that very module."""

import sys

from ...kernels import onnx_translation

sys.modules[__name__] = onnx_translation
