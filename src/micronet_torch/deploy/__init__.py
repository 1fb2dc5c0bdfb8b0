"""Deploy mode: an inference-only MicroNet with the same outputs and far fewer, cheaper operators.

The compiler lowers an eval-mode model to a flat list of operations (``ir``, ``lower``), moves every channel
permutation to where it costs nothing (``permutations``), fuses for the target runtime (``fusions``) and
builds modules (``modules``, ``convert``); ``portable`` is the gather-free form for
OpenVINO, ExecuTorch, LiteRT and ncnn. ``fused`` holds the fused Dynamic Shift-Max operator for ONNX
Runtime. Every rewrite is exact up to float rounding (``docs/deploy.md``).
"""

from .convert import BACKENDS, DeployMicroNet, build_modules, convert_to_deploy, deploy_summary
from .fusions import expand_multipliers, fold_shift_max_scale, merge_separable, phase_stem
from .ir import NCHWC_BLOCK, Add, Conv, Op, Opaque, Perm, PhaseStem, Pointwise, Save, ShiftMax
from .lower import lower, shift_max_op
from .modules import ChannelGather, EdgeCorrectedConv, FusedShiftMax, PhaseStemConv, ResidualSequence, RowFoldedConv
from .permutations import conv_input_perm, conv_output_perm, optimize
from .portable import RUNTIME_OPTIONS, PortableMicroNet, PortableShiftMax, channel_runs, densify_shuffles

__all__ = [
    "BACKENDS",
    "NCHWC_BLOCK",
    "RUNTIME_OPTIONS",
    "Add",
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
    "shift_max_op",
]
