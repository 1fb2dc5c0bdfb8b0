"""The int8 ``.tflite`` as TensorFlow Lite Micro reads it: what the export rewrites in the quantized flatbuffer, and
what a file holds.

ai-edge-quantizer writes a model TFLM can run but pays for in flash and SRAM, and the Python object API writes it
without the schema's alignment. The rewrites, each leaving every int8 output unchanged in TFLM and LiteRT:
``drop_conv_bias_scales`` (per-channel bias scales no int8 conv kernel reads), ``constant_matmuls_adj_y`` (each
constant matmul operand stored transposed, else TFLM copies it into its arena), ``pack_for_tflm`` (every buffer
inside the flatbuffer, 16-byte aligned, identical vectors stored once). ``describe`` reads a file's ops, tensors and
quantization for the export's checks and the tests. No library does these: the quantizer and the flatbuffer tools
write and read files, not TFLM's memory layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT32, INT32, INT8 = 0, 2, 9  # tflite TensorType
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")  # their second input is the weights
CONV_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D"}  # their third input, the int32 bias, is read without its scales


def read_model(data: bytes | bytearray) -> Any:
    """A ``.tflite``'s bytes as a flatbuffer ``ModelT`` (buffers stored after the flatbuffer read into it)."""
    from ai_edge_litert.tools import flatbuffer_utils  # optional heavy dependency: only when exporting

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def constant_matmuls_adj_y(model: Any) -> int:
    """Store the constant, per-tensor int8 right operand of every BATCH_MATMUL transposed, with ``adj_y`` set (the
    same product); the number rewritten. TFLM's BATCH_MATMUL wants that operand transposed and otherwise copies it,
    transposed, into its arena at ``AllocateTensors`` (the whole weight matrix in SRAM)."""
    from ai_edge_litert.tools import flatbuffer_utils

    done = 0
    for sub in model.subgraphs:
        transposed: set[int] = set()  # right operands already stored transposed (one tensor read by several ops)
        for op in sub.operators:
            if flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) != "BATCH_MATMUL" or op.builtinOptions.adjY:
                continue
            rhs = sub.tensors[op.inputs[1]]
            data, q = model.buffers[rhs.buffer].data, rhs.quantization
            if data is None or len(data) == 0 or rhs.type != INT8 or q is None or len(q.scale) != 1:
                continue
            if op.inputs[1] not in transposed:
                shape = [int(d) for d in rhs.shape]
                w = np.frombuffer(bytes(data), dtype=np.int8).reshape(shape)
                model.buffers[rhs.buffer].data = np.ascontiguousarray(np.swapaxes(w, -1, -2)).view(np.uint8).ravel()
                rhs.shape = np.array(shape[:-2] + shape[:-3:-1], dtype=np.int32)
                if rhs.shapeSignature is not None and len(rhs.shapeSignature) == len(shape):
                    sig = [int(d) for d in rhs.shapeSignature]
                    rhs.shapeSignature = np.array(sig[:-2] + sig[:-3:-1], dtype=np.int32)
                transposed.add(op.inputs[1])
            op.builtinOptions.adjY = True
            done += 1
    return done


def drop_conv_bias_scales(model: Any) -> int:
    """Remove the quantization parameters of every int32 bias that only convolutions read; the number removed.

    A per-channel conv's bias lives in the accumulator's scale, ``input_scale * filter_scale[c]``, which TFLM's and
    LiteRT's int8 CONV_2D / DEPTHWISE_CONV_2D derive from the input and filter tensors: neither reads the bias's own
    scales (4 bytes per output channel, about 30 KB of M0's flash). FULLY_CONNECTED's per-tensor path does check its
    bias scale against ``input_scale * filter_scale``, so a bias it reads keeps its parameters."""
    from ai_edge_litert.tools import flatbuffer_utils

    dropped = 0
    for sub in model.subgraphs:
        readers: dict[int, set[str]] = {}
        for op in sub.operators:
            name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
            for slot, index in enumerate(op.inputs):
                if index >= 0:
                    readers.setdefault(int(index), set()).add(name if slot == 2 else "")
        for index, ops in readers.items():
            tensor = sub.tensors[index]
            if tensor.type == INT32 and tensor.quantization is not None and ops <= CONV_OPS:
                tensor.quantization = None
                dropped += 1
    return dropped


def pack_for_tflm(model: Any) -> bytes:
    """Serialize a tflite ``ModelT`` for TFLM: every buffer inside the flatbuffer at a 16-byte aligned offset (the
    schema's ``force_align: 16``, which the Python object API ignores; a Cortex-M0 faults on unaligned int32 biases)
    and identical per-channel vectors stored once (flatbuffers allows shared vectors): the weights' and biases'
    int64 zero points are all zeros, 8 bytes a channel, a sixth of M0's file when each tensor has its own."""
    import flatbuffers  # comes with ai-edge-litert

    class Builder(flatbuffers.Builder):
        seen: dict[tuple[str, bytes], int]

        def CreateNumpyVector(self, x: np.ndarray) -> int:
            if x.dtype == np.uint8:  # buffer data
                self.Prep(16, x.size)
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.tobytes())
            if key not in self.seen:
                self.seen[key] = super().CreateNumpyVector(x)
            return self.seen[key]

    for buf in model.buffers:
        if buf.data is not None:
            buf.data = np.frombuffer(bytes(buf.data), dtype=np.uint8)
    for sub in model.subgraphs:
        for t in sub.tensors:
            q = t.quantization
            if q is not None and q.scale is not None:
                q.scale = np.asarray(q.scale, dtype=np.float32)
            if q is not None and q.zeroPoint is not None:
                q.zeroPoint = np.asarray(q.zeroPoint, dtype=np.int64)
    builder = Builder(1 << 20)
    builder.seen = {}
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def describe(data: bytes) -> dict[str, Any]:
    """Op counts, tensor count, float tensors, the input / output quantization of a ``.tflite`` and, per op name, the
    number of scales of each such op's weights and bias (``weight_scales``: 1 for per-tensor weights;
    ``bias_scales``: 0 for a bias without quantization parameters); per BATCH_MATMUL, its right operand's number of
    scales and whether it is stored transposed (``matmuls``: (scales, adj_y))."""
    from ai_edge_litert import schema_py_generated
    from ai_edge_litert.tools import flatbuffer_utils

    model = read_model(data)
    sub = model.subgraphs[0]
    ops: dict[str, int] = {}
    weight_scales: dict[str, list[int]] = {}
    bias_scales: dict[str, list[int]] = {}
    matmuls: list[tuple[int, bool]] = []
    for op in sub.operators:
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        ops[name] = ops.get(name, 0) + 1
        for slot, table in ((1, weight_scales), (2, bias_scales)):
            if name in WEIGHTED_OPS and len(op.inputs) > slot and op.inputs[slot] >= 0:
                q = sub.tensors[op.inputs[slot]].quantization
                table.setdefault(name, []).append(0 if q is None or q.scale is None else len(q.scale))
        if name == "BATCH_MATMUL":
            q = sub.tensors[op.inputs[1]].quantization
            matmuls.append((0 if q is None or q.scale is None else len(q.scale), bool(op.builtinOptions.adjY)))
    floats = [str(i) for i, t in enumerate(sub.tensors) if t.type == FLOAT32]

    def quant(index: int) -> tuple[float, int]:
        q = sub.tensors[index].quantization
        return float(q.scale[0]), int(q.zeroPoint[0])

    root = schema_py_generated.Model.GetRootAs(bytes(data), 0)
    misaligned = 0
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        if buf.DataLength():
            misaligned += buf._tab.Vector(buf._tab.Offset(4)) % 16 != 0  # the data's offset in the file
    return dict(
        misaligned_buffers=misaligned,
        ops=ops,
        weight_scales=weight_scales,
        bias_scales=bias_scales,
        matmuls=matmuls,
        tensors=len(sub.tensors),
        float_tensors=floats,
        input_type=int(sub.tensors[sub.inputs[0]].type),
        output_type=int(sub.tensors[sub.outputs[0]].type),
        input_quant=quant(sub.inputs[0]),
        output_quant=quant(sub.outputs[0]),
        # the raw table: a buffer stored after the flatbuffer (offset > 1) is one TFLM would not see
        buffers_after=any((b.offset or 0) > 1 for b in flatbuffer_utils.convert_bytearray_to_object(data).buffers),
    )
