"""The ``.safetensors`` header checked against the file before the safetensors library sees it.

The library checks much of this too, but its errors are not all one line and it trusts the header's length to
allocate; checked here first, every lie about sizes, dtypes or offsets is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import json
import math
import struct

from .errors import CheckpointError

SAFETENSORS_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSORS = 20_000
MAX_NDIM = 32


def check_safetensors(data: bytes, source: str) -> dict[str, str]:
    """Check a ``.safetensors`` header against the file (sizes, dtypes, offsets); its metadata, or CheckpointError.

    The safetensors library checks much of this too, but its errors are not all one line and it trusts the
    header's length to allocate; checked here first, every lie about sizes is a one-line refusal.
    """

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a readable .safetensors file ({reason})")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the header length field")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise bad(f"the header claims {n} bytes, but the file has {len(data) - 8} after the length field")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise bad(f"the header is not JSON: {type(err).__name__}") from None
    if type(header) is not dict:
        raise bad("the header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise bad(f"{len(header)} tensors, more than any MicroNet has")
    body = len(data) - 8 - n
    meta = header.pop("__metadata__", None) or {}
    if type(meta) is not dict or not all(type(k) is str and type(v) is str for k, v in meta.items()):
        raise bad("its metadata is not a map of strings")
    spans = []
    for key, info in header.items():
        name = repr(key[:80])
        if type(info) is not dict or set(info) - {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name} has no valid description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise bad(f"tensor {name} has dtype {str(dtype)[:20]!r}, not a plain numeric type")
        if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name} has shape {str(shape)[:60]}, not a short list of non-negative integers")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise bad(f"tensor {name} has no [begin, end] data offsets")
        begin, end = offsets
        need = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
        if not 0 <= begin <= end <= body:
            raise bad(f"tensor {name}'s data [{begin}, {end}] lies outside the file's {body} data bytes")
        if end - begin != need:
            raise bad(f"tensor {name} has {end - begin} bytes of data, but shape {shape[:8]} of {dtype} needs {need}")
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise bad(f"tensor data overlaps or leaves a gap at byte {min(begin, pos)}")
        pos = end
    if pos != body:
        raise bad(f"{body - pos} bytes after the last tensor's data")
    return meta


__all__ = ["MAX_HEADER_BYTES", "SAFETENSORS_ITEMSIZE", "check_safetensors"]
