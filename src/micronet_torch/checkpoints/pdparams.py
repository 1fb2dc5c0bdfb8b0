"""The PaddleClas ``.pdparams`` unpickler: tensors with Paddle's names, without Paddle and without numpy.

A ``.pdparams`` is a pickle of a dict from names to numpy arrays. numpy trusts the dtype and array state
it is given: a crafted dtype with an object field makes it dereference bytes of the file as a pointer,
a field offset past the item size makes it copy heap memory into the array. So the unpickler here hands
back its own small stand-ins for ``numpy.dtype``, ``numpy.ndarray`` and ``_reconstruct``, accepts only
plain numeric dtypes and exact byte lengths, bounds the total size, and builds the tensors from the
file's bytes itself. Every failure is a ``CheckpointError`` with a one-line reason naming the file.

This module only unpickles: the file is read by ``files.read_file_bounded``, and Paddle's names become the
published code's in ``state_dict.paddleclas_filter_fn``.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError
from .files import DEFAULT_MAX_BYTES, MAX_BYTES_ENV

MAX_NDIM = 32
MAX_ENTRIES = 20_000  # MicroNet M3 has under 600 tensors; a million tiny ones would only cost time and memory
SKIPPED_KEY = "StructuredToParameterName@@"

# numpy's type code (as numpy's dtype pickles it) -> (torch dtype, item size)
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "f2": (torch.float16, 2),
    "f4": (torch.float32, 4),
    "f8": (torch.float64, 8),
    "i1": (torch.int8, 1),
    "i2": (torch.int16, 2),
    "i4": (torch.int32, 4),
    "i8": (torch.int64, 8),
    "u1": (torch.uint8, 1),
    "b1": (torch.bool, 1),
}

# Opcodes of the pickles numpy and Paddle write (protocols 2-4) and the harmless containers around them.
# Refused: persistent ids, the copyreg extension registry, INST/OBJ/NEWOBJ (object creation other than
# REDUCE on our stand-ins), out-of-band buffers, and the text opcodes of protocol 0.
_ALLOWED_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP MEMOIZE PUT BINPUT LONG_BINPUT GET BINGET LONG_BINGET "
    "NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 LONG4 BINFLOAT "
    "SHORT_BINUNICODE BINUNICODE BINUNICODE8 SHORT_BINBYTES BINBYTES BINBYTES8 "
    "EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST EMPTY_DICT DICT SETITEM SETITEMS "
    "GLOBAL STACK_GLOBAL REDUCE BUILD".split()
)
_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


class _Bad(Exception):
    """Internal: the file breaks a rule; the text is the reason."""


def _is_int(value: Any) -> bool:
    return type(value) is int


class _DType:
    """Stand-in for ``numpy.dtype``: a plain numeric type code and a byte order, nothing else."""

    __slots__ = ("code", "order")

    def __init__(self, *args: Any) -> None:
        if not 1 <= len(args) <= 3 or type(args[0]) is not str or not all(type(a) is bool for a in args[1:]):
            raise _Bad("a dtype is made from something other than a type code")
        if args[0] not in _DTYPES:
            raise _Bad(f"dtype {args[0][:20]!r} is not a plain numeric type")
        self.code, self.order = args[0], "="

    def __setstate__(self, state: Any) -> None:
        # numpy writes (3, order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise _Bad("a dtype state has an unknown layout")
        order, subarray, names, fields, elsize, alignment, flags = state[1:8]
        size = _DTYPES[self.code][1]
        if subarray is not None or names is not None or fields is not None:
            raise _Bad("a dtype has fields or a subarray (only plain numeric arrays are allowed)")
        if len(state) == 9 and state[8] is not None:
            raise _Bad("a dtype carries metadata")
        if not (_is_int(elsize) and elsize in (-1, size) and _is_int(alignment) and -1 <= alignment <= 16):
            raise _Bad("a dtype states an item size or alignment that does not match its type")
        if not _is_int(flags) or flags != 0:
            raise _Bad("a dtype has object or reference flags")
        if order not in ("<", ">", "=", "|") or (order == "|" and size > 1):
            raise _Bad("a dtype has no valid byte order")
        self.order = order


class _NDArray:
    """Stand-in for ``numpy.ndarray``: a shape, a dtype stand-in, a Fortran flag and the raw bytes."""

    __slots__ = ("data", "dtype", "fortran", "shape")

    def __init__(self) -> None:
        self.shape = self.dtype = self.fortran = self.data = None

    def __setstate__(self, state: Any) -> None:
        # numpy writes (1, shape, dtype, is_fortran, raw bytes); very old files lack the version
        if type(state) is not tuple or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise _Bad("an array state has an unknown layout")
        shape, dtype, fortran, data = state[-4:]
        if type(shape) is not tuple or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Bad("an array shape is not a short tuple of non-negative integers")
        if type(dtype) is not _DType:
            raise _Bad("an array has no plain dtype")
        if type(fortran) is not bool:
            raise _Bad("an array's Fortran flag is not a bool")
        if type(data) is not bytes:
            raise _Bad("an array's data is not raw bytes (object and string arrays are refused)")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, fortran, data


def _reconstruct(cls: Any, shape: Any, code: Any) -> _NDArray:
    """Stand-in for numpy's ``_reconstruct``: an empty array stand-in, filled by the BUILD that follows."""
    if cls is not _NDArray or type(shape) is not tuple or type(code) is not bytes:
        raise _Bad("an array is reconstructed from unexpected arguments")
    return _NDArray()


_STAND_INS: dict[tuple[str, str], Any] = {
    ("numpy", "dtype"): _DType,
    ("numpy", "ndarray"): _NDArray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
}


class _StandInUnpickler(pickle.Unpickler):
    """Resolves the three numpy names a ``.pdparams`` uses to the stand-ins above; refuses every other name."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _STAND_INS[(module, name)]
        except (KeyError, TypeError):
            raise _Bad(f"refusing {str(module)[:60]}.{str(name)[:60]}: a .pdparams holds only numpy arrays") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Bad("persistent ids are refused")


def _prescan(data: bytes) -> None:
    """Check every opcode before unpickling: only allowed opcodes, honest lengths, sequential memo indices.

    The C unpickler allocates what a length or memo index says before reading; checked here first, a
    few bytes cannot make it reserve gigabytes.
    """
    puts = 0
    stream = io.BytesIO(data)
    for op, arg, pos in pickletools.genops(stream):
        if op.name not in _ALLOWED_OPCODES:
            raise _Bad(f"opcode {op.name} at byte {pos} is not used by .pdparams files")
        if op.name == "FRAME" and arg > len(data) - stream.tell():
            raise _Bad(f"a frame at byte {pos} is longer than the file")
        if op.name in _PUT_OPCODES:
            if op.name != "MEMOIZE" and (not _is_int(arg) or arg > puts):
                raise _Bad(f"memo index {arg} at byte {pos} skips ahead")
            puts += 1


@dataclass(frozen=True)
class RawArray:
    """One array as the file states it: numpy type code, byte order, shape, Fortran flag and its bytes."""

    code: str
    order: str
    shape: tuple[int, ...]
    fortran: bool
    data: bytes


def _checked(key: str, arr: Any, budget: list[int]) -> RawArray:
    if type(arr) is not _NDArray or arr.data is None:
        raise _Bad(f"entry {key[:80]!r} is not an array")
    size = _DTYPES[arr.dtype.code][1]
    numel = math.prod(arr.shape) if all(d <= budget[0] for d in arr.shape) else budget[0] + 1
    cost = max(len(arr.data), numel * 4)  # the copy of the bytes, then the float32 tensor
    if numel > budget[0] or cost > budget[0]:
        raise _Bad(f"entry {key[:80]!r} (shape {list(arr.shape)[:8]}) exceeds the size limit (see {MAX_BYTES_ENV})")
    if len(arr.data) != numel * size:
        raise _Bad(
            f"entry {key[:80]!r} has {len(arr.data)} bytes of data, but shape {list(arr.shape)} of "
            f"{arr.dtype.code} needs {numel * size}"
        )
    budget[0] -= cost
    return RawArray(arr.dtype.code, arr.dtype.order, arr.shape, arr.fortran, arr.data)


def parse_pdparams(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, RawArray | None]:
    """The arrays a ``.pdparams`` pickle states, checked but not yet tensors; skipped entries map to None.

    Raises ``_Bad`` (any other exception is the unpickler's own and is turned into a reason by the caller).
    """
    _prescan(data)
    raw = _StandInUnpickler(io.BytesIO(data)).load()
    if type(raw) is not dict:
        raise _Bad(f"expected a dict of arrays, found {type(raw).__name__}")
    if len(raw) > MAX_ENTRIES:
        raise _Bad(f"{len(raw)} entries, more than any MicroNet has ({MAX_ENTRIES})")
    budget = [max_bytes]
    out: dict[str, RawArray | None] = {}
    for key, value in raw.items():
        if type(key) is not str:
            raise _Bad(f"a key is {type(key).__name__}, not a name")
        out[key] = None if key == SKIPPED_KEY else _checked(key, value, budget)
    return out


def to_tensor(arr: RawArray) -> torch.Tensor:
    """A float32 tensor owning a copy of the array's bytes (byte order and Fortran order applied)."""
    dtype_, size = _DTYPES[arr.code]
    shape = tuple(reversed(arr.shape)) if arr.fortran else arr.shape
    if not arr.data:
        return torch.zeros(arr.shape, dtype=torch.float32)
    buf = torch.frombuffer(bytearray(arr.data), dtype=torch.uint8)
    swap = arr.order == ("<" if sys.byteorder == "big" else ">")
    if swap and size > 1:
        buf = buf.view(-1, size).flip(1).reshape(-1)
    if dtype_ is torch.bool:
        flat = buf != 0  # a bool byte other than 0 or 1 is undefined for torch; any non-zero is True
    else:
        flat = buf.view(dtype_)
    tensor = flat.reshape(shape)
    if arr.fortran:
        tensor = tensor.permute(*reversed(range(tensor.ndim)))
    return tensor.to(torch.float32).contiguous()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if not isinstance(err, _Bad):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text[:300]


def unpickle_pdparams(
    data: bytes, source: str = "<bytes>", max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, torch.Tensor]:
    """The float32 tensors a ``.pdparams`` pickle holds, under Paddle's own names (the skipped entry left out).

    ``max_bytes`` bounds the bytes and the tensors made from them; every failure raises ``CheckpointError``
    with a one-line reason naming ``source``.
    """
    try:
        if len(data) > max_bytes:
            raise _Bad(f"{len(data)} bytes is more than the size limit ({max_bytes}; see {MAX_BYTES_ENV})")
        return {key: to_tensor(arr) for key, arr in parse_pdparams(data, max_bytes).items() if arr is not None}
    except Exception as err:  # _Bad, and whatever the C unpickler raises on a broken stream
        raise CheckpointError(f"{source}: not a readable PaddlePaddle .pdparams file ({_one_line(err)})") from err


__all__ = ["SKIPPED_KEY", "RawArray", "parse_pdparams", "to_tensor", "unpickle_pdparams"]
