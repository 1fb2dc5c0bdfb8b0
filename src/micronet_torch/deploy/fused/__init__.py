"""The ``micronet.ShiftMax`` runtime operator under its former name: ``micronet_torch.kernels.ort_ops`` (the
library and its registration) and ``micronet_torch.kernels.op`` (the PyTorch operator).

``micronet_torch.fused_ops`` is an alias of this package (the public name since 0.1).
"""

from ...kernels.op import DOMAIN, shift_max
from ...kernels.ort_ops import (
    FusedOpsUnavailable,
    cache_dir,
    library,
    library_path,
    onnx_translation_table,
    register,
    uses_fused_ops,
)

__all__ = [
    "DOMAIN",
    "FusedOpsUnavailable",
    "cache_dir",
    "library",
    "library_path",
    "onnx_translation_table",
    "register",
    "shift_max",
    "uses_fused_ops",
]
