"""Dynamic Shift-Max as one PyTorch operator, ``micronet::shift_max``: the reference every runtime operator
implements.

Deploy graphs built with ``fused_ops=True`` call it; the dynamo ONNX exporter writes it as one
``micronet.ShiftMax`` node (``onnx_translation``), which ONNX Runtime runs from the C library of ``ort_ops``
and OpenVINO through the extension of ``openvino_ops``; ExecuTorch programs call it as the kernel of
``executorch_ops``.
"""

from __future__ import annotations

import torch

DOMAIN = "micronet"


@torch.library.custom_op("micronet::shift_max", mutates_args=())
def shift_max(x: torch.Tensor, coef: torch.Tensor, index: list[int], k: int, j: int) -> torch.Tensor:
    """Dynamic Shift-Max's fusion and max, given its coefficients: the reference of ``micronet.ShiftMax``.

    Output channel ``a`` reads input channels ``index[a*j : (a+1)*j]`` (x, then its shift) and coefficients
    ``coef[:, a*k*j : (a+1)*k*j]`` in (k, j) order: ``y_a = max_k sum_j coef[a, k, j] * x[index[a*j + j]]``.
    """
    n, c_out = x.shape[0], len(index) // j
    u = torch.index_select(x, 1, torch.tensor(index, dtype=torch.long, device=x.device))
    y = torch.matmul(coef.reshape(n, c_out, k, j), u.reshape(n, c_out, j, -1))
    y = y.amax(2) if k > 1 else y[:, :, 0]
    return y.reshape(n, c_out, x.shape[2], x.shape[3])


@shift_max.register_fake
def _shift_max_fake(x: torch.Tensor, coef: torch.Tensor, index: list[int], k: int, j: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], len(index) // j, x.shape[2], x.shape[3]))
