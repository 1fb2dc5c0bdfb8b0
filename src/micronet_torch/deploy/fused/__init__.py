"""The fused Dynamic Shift-Max operator for ONNX Runtime: the PyTorch op, its ONNX translation, the C library.

``micronet_torch.fused_ops`` is an alias of this package (the public name since 0.1).
"""

from .build import FusedOpsUnavailable, cache_dir, library_path, onnx_translation_table, register, uses_fused_ops
from .op import DOMAIN, shift_max

__all__ = [
    "DOMAIN",
    "FusedOpsUnavailable",
    "cache_dir",
    "library_path",
    "onnx_translation_table",
    "register",
    "shift_max",
    "uses_fused_ops",
]
