"""Deploy mode: an inference-only MicroNet with the same outputs and far fewer, cheaper operators.

One compiler: ``lower`` flattens an eval-mode model to a list of simple operations (``ir``); a backend
(``backends``: ``eager``, ``onnx``, ``portable``, ``portable-openvino``, ...) runs its passes from the one pass
list (``passes``: permutations moved to where they cost nothing, ``permutations``; fusions for the target
runtime, ``fusions``) and its emitter (``emit``) builds the modules (``modules`` with gathers for PyTorch and
ONNX Runtime, ``portable`` without for OpenVINO, ExecuTorch, LiteRT and ncnn); ``convert_to_deploy`` runs a
backend by name. ``fused`` holds the fused Dynamic Shift-Max operator for ONNX Runtime. Every rewrite is exact
up to float rounding (``docs/deploy.md``).
"""

from .backends import (
    BACKENDS,
    PORTABLE_OPTIONS,
    RUNTIME_BACKENDS,
    RUNTIME_OPTIONS,
    Backend,
    portable_features,
    portable_ops,
)
from .convert import convert_to_deploy, deploy_summary
from .emit import build_modules
from .fusions import expand_multipliers, fold_shift_max_scale, merge_separable, phase_stem
from .ir import NCHWC_BLOCK, Add, Conv, Op, Opaque, Perm, PhaseStem, Pointwise, Save, ShiftMax
from .lower import lower, shift_max_op
from .modules import (
    ChannelGather,
    DeployMicroNet,
    EdgeCorrectedConv,
    FusedShiftMax,
    PhaseStemConv,
    ResidualSequence,
    RowFoldedConv,
)
from .passes import PASSES
from .permutations import conv_input_perm, conv_output_perm, densify_shuffles, optimize
from .portable import PortableMicroNet, PortableShiftMax, channel_runs

__all__ = [
    "BACKENDS",
    "NCHWC_BLOCK",
    "PASSES",
    "PORTABLE_OPTIONS",
    "RUNTIME_BACKENDS",
    "RUNTIME_OPTIONS",
    "Add",
    "Backend",
    "ChannelGather",
    "Conv",
    "DeployMicroNet",
    "EdgeCorrectedConv",
    "FusedShiftMax",
    "Op",
    "Opaque",
    "Perm",
    "PhaseStem",
    "PhaseStemConv",
    "Pointwise",
    "PortableMicroNet",
    "PortableShiftMax",
    "ResidualSequence",
    "RowFoldedConv",
    "Save",
    "ShiftMax",
    "build_modules",
    "channel_runs",
    "conv_input_perm",
    "conv_output_perm",
    "convert_to_deploy",
    "densify_shuffles",
    "deploy_summary",
    "expand_multipliers",
    "fold_shift_max_scale",
    "lower",
    "merge_separable",
    "optimize",
    "phase_stem",
    "portable_features",
    "portable_ops",
    "shift_max_op",
]
