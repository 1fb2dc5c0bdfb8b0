"""The onnxscript side of the runtime operator: how ``torch.ops.micronet.shift_max`` is written into an ONNX graph.

Kept apart because onnxscript resolves a script function's names from its module's globals, and because
importing onnxscript is only worth its time when exporting.
"""

from onnxscript import FLOAT, script
from onnxscript.values import Opset

from .op import DOMAIN

micronet = Opset(DOMAIN, 1)


@script(micronet)
def shift_max_onnx(x: FLOAT, coef: FLOAT, index: list[int], k: int, j: int) -> FLOAT:
    return micronet.ShiftMax(x, coef, index=index, k=k, j=j)
