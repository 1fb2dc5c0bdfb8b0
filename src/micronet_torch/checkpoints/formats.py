"""What a file is, judged from its bytes: the checkpoint formats this package reads, and a name for the rest.

Files are read by content, not by name: a ``.pth`` that holds a ``.safetensors`` is read as one, and a
file that is none of the formats (an ONNX model, an image, notes) is named in the error instead of being
fed to a parser that fails with a traceback.
"""

from __future__ import annotations

import pickle

# torch.save's legacy (non-zip) format starts with this number, pickled with protocol 2
_TORCH_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]
# (magic at offset 0, what it is): the files people most often pass by mistake
_MAGICS = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x7fELF", "a compiled program or library (ELF)"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"\x89HDF", "an HDF5 file (Keras / h5py weights)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
    (b"\xfd7zXZ", "an xz archive"),
)


def sniff(data: bytes) -> str:
    """The format of a file's bytes, a key of ``readers.READERS``: ``torch`` (zip or legacy), ``safetensors``,
    ``pdparams`` (any other pickle: PaddleClas's are pickles of numpy arrays), or ``other``."""
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        return "torch"  # torch.save's zip format; other zips are named after torch refuses them
    if data.startswith(_TORCH_LEGACY_MAGIC):
        return "torch"
    if len(data) >= 10 and data[8:9] == b"{":
        return "safetensors"
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return "pdparams"
    return "other"


def _looks_like_onnx(data: bytes) -> bool:
    # ModelProto: field 1 (ir_version, a small varint), then a length-delimited field (producer, graph, opset)
    return len(data) > 4 and data[0] == 0x08 and 1 <= data[1] <= 30 and data[2] in (0x12, 0x1A, 0x22, 0x2A, 0x3A, 0x42)


def describe(data: bytes, suffix: str = "") -> str:
    """A short phrase for what ``data`` looks like, for "not a checkpoint this package reads: ..."."""
    if not data:
        return "an empty file"
    if suffix == ".onnx" or _looks_like_onnx(data):
        return "an ONNX model (protobuf); evaluate exported models with ONNX Runtime, not as a checkpoint"
    for magic, what in _MAGICS:
        if data.startswith(magic):
            return what
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a WebP image"
    if data.startswith(b"PK"):
        return "a zip archive that is not a PyTorch checkpoint"
    if len(data) > 262 and data[257:262] == b"ustar":
        return "a tar archive (unpack it first)"
    if data[:1] == b"\x80" or data.startswith((b"(", b"]", b"}")):
        return "a pickle that is neither a PyTorch checkpoint nor a PaddleClas .pdparams"
    head = data[:2048]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        text = head[: err.start].decode("utf-8") if err.start > len(head) - 4 else None
    if text is not None and sum(c.isprintable() or c in "\n\r\t" for c in text) >= 0.95 * max(1, len(text)):
        start = " ".join(text.split())[:40]
        kind = "JSON" if start[:1] in "{[" else "a text file"
        return f"{kind} (starting {start!r})" if kind != "JSON" else f"a JSON file (starting {start!r})"
    return f"unknown binary data (first bytes {data[:8].hex(' ')})"


__all__ = ["describe", "sniff"]
