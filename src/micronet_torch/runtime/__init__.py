"""Runtimes: export a (deploy-mode) model to each target's file format, run it, and check it against PyTorch.

``targets.TARGETS`` is the table of formats that ``micronet export`` and ``micronet bench`` share; ``ort`` holds
ONNX Runtime sessions and int8 quantization; ``parity`` the checks every export passes; ``openvino``,
``executorch``, ``litert`` and ``ncnn`` the optional runtimes (each imports its package only when used);
``metadata`` what an exported file carries for users without this package.
"""

from .calibration import calibration_images, synthetic_images
from .export import ExportOptions, ExportReport, export_and_check, export_checked, export_model
from .metadata import export_metadata
from .onnx import DEFAULT_OPSET, count_nodes, export_onnx
from .ort import INT8_FORMATS, ort_nodes_after_optimization, ort_session, quantize_onnx, run_ort
from .parity import FP32_TOLERANCE, INT8_MIN_AGREEMENT, check_fp32, check_int8, reference_logits
from .result import ConversionError, ExportError, ExportResult
from .targets import FORMATS, TARGETS, Target, load_exported, target_of_file
from .torch_export import export_program, export_torchscript

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "FP32_TOLERANCE",
    "INT8_FORMATS",
    "INT8_MIN_AGREEMENT",
    "TARGETS",
    "ConversionError",
    "ExportError",
    "ExportOptions",
    "ExportReport",
    "ExportResult",
    "Target",
    "calibration_images",
    "check_fp32",
    "check_int8",
    "count_nodes",
    "export_and_check",
    "export_checked",
    "export_metadata",
    "export_model",
    "export_onnx",
    "export_program",
    "export_torchscript",
    "load_exported",
    "ort_nodes_after_optimization",
    "ort_session",
    "quantize_onnx",
    "reference_logits",
    "run_ort",
    "synthetic_images",
    "target_of_file",
]
