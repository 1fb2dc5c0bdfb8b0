"""The C++ source pair a TensorFlow Lite Micro firmware compiles as it is, written beside the int8 ``.tflite``.

``<stem>_model_data.h`` declares, in ``namespace <stem>``: the model bytes (16-byte aligned, as TFLM's loader
wants), ``kArenaSize`` (TFLM's measured arena use on this host plus a stated margin), the input's and the output's
quantization, ``QuantizePixel`` / ``DequantizeOutput``, the class names, and ``RegisterOps`` that adds to a
``tflite::MicroMutableOpResolver<kNumOps>`` exactly the builtin ops the model uses. ``<stem>_model_data.cc``
holds the bytes and the class names. docs/mcu.md shows how a firmware uses them.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from .._fs import atomic_write

ARENA_MARGIN = 0.10  # the arena asked for: TFLM's measured use on this host plus this share, rounded up to 1 KiB
RESOLVER_HEADER = "tensorflow/lite/micro/micro_mutable_op_resolver.h"


def resolver_method(op: str) -> str:
    """``MicroMutableOpResolver``'s method for a builtin op name: CONV_2D -> AddConv2D, RELU6 -> AddRelu6."""
    return "Add" + "".join(w if re.fullmatch(r"\d+D", w) else w.capitalize() for w in op.split("_"))


def arena_size(measured: int) -> int:
    """The arena a firmware should reserve for a measured use (bytes): ``ARENA_MARGIN`` more, whole KiB."""
    return int(math.ceil(measured * (1 + ARENA_MARGIN) / 1024) * 1024)


def _identifier(stem: str) -> str:
    ident = re.sub(r"\W", "_", stem)
    return ident if not ident[0].isdigit() else "m_" + ident


def _bytes_lines(data: bytes, per_line: int = 16) -> str:
    return "\n".join(
        "    " + " ".join(f"0x{b:02x}," for b in data[i : i + per_line]) for i in range(0, len(data), per_line)
    )


def cpp_header(tflite: str | os.PathLike) -> Path:
    """``<stem>_model_data.h`` beside the ``.tflite``."""
    tflite = Path(tflite)
    return tflite.with_name(tflite.stem + "_model_data.h")


def cpp_source(tflite: str | os.PathLike) -> Path:
    """``<stem>_model_data.cc`` beside the ``.tflite``."""
    tflite = Path(tflite)
    return tflite.with_name(tflite.stem + "_model_data.cc")


def write_cpp(
    tflite: str | os.PathLike,
    ops: dict[str, int],
    arena_measured: dict[str, int],
    input_quant: tuple[float, int],
    output_quant: tuple[float, int],
    input_shape: tuple[int, int, int],
    class_names: list[str],
) -> tuple[Path, Path]:
    """Write ``<stem>_model_data.h`` and ``.cc`` beside ``tflite``; returns their paths.

    ``arena_measured``: TFLM's ``{"total", "head", "tail"}`` bytes; ``input_shape``: (H, W, C).
    """
    tflite = Path(tflite)
    data = tflite.read_bytes()
    ns = _identifier(tflite.stem)
    header, source = cpp_header(tflite), cpp_source(tflite)
    names = sorted(ops)
    total = int(arena_measured.get("total", 0))
    h, w, c = input_shape
    register = "\n".join(f"  if (r.{resolver_method(op)}() != kTfLiteOk) return kTfLiteError;" for op in names)
    hdr = f"""// {tflite.name} for TensorFlow Lite Micro, written by micronet-torch
// (micronet export --format tflm). Fully int8: int8 input (camera pixel - 128) and int8 logits.
#pragma once

#include <cstddef>
#include <cstdint>

#include "{RESOLVER_HEADER}"

namespace {ns} {{

// the flatbuffer, 16-byte aligned
extern const unsigned char kModelData[];
extern const unsigned int kModelDataLen;

// TFLM's arena: {total} bytes measured on a 64-bit host ({arena_measured.get("head", 0)} activations +
// {arena_measured.get("tail", 0)} fixed), plus {ARENA_MARGIN:.0%} margin; a 32-bit target needs less (4-byte pointers)
constexpr size_t kArenaSize = {arena_size(total)};

constexpr int kInputHeight = {h}, kInputWidth = {w}, kInputChannels = {c};  // NHWC, batch 1
constexpr float kInputScale = {input_quant[0]!r}f;
constexpr int kInputZeroPoint = {input_quant[1]};
constexpr float kOutputScale = {output_quant[0]!r}f;
constexpr int kOutputZeroPoint = {output_quant[1]};
constexpr int kNumClasses = {len(class_names)};
extern const char* const kClassNames[kNumClasses];

// a camera pixel (0..255) as the model's int8 input: no float arithmetic on the board
inline int8_t QuantizePixel(uint8_t pixel) {{ return static_cast<int8_t>(static_cast<int>(pixel) + kInputZeroPoint); }}
// an int8 logit as a float (argmax needs no dequantization: the scale is positive)
inline float DequantizeOutput(int8_t q) {{
  return kOutputScale * static_cast<float>(static_cast<int>(q) - kOutputZeroPoint);
}}

// exactly the builtin ops the model uses
constexpr int kNumOps = {len(names)};
using OpResolver = tflite::MicroMutableOpResolver<kNumOps>;
inline TfLiteStatus RegisterOps(OpResolver& r) {{
{register}
  return kTfLiteOk;
}}

}}  // namespace {ns}
"""
    labels = ",\n".join("    " + json.dumps(str(n)) for n in class_names)
    src = f"""// {tflite.name} as a C++ array (see {header.name}).
#include "{header.name}"

namespace {ns} {{

alignas(16) const unsigned char kModelData[] = {{
{_bytes_lines(data)}
}};
const unsigned int kModelDataLen = {len(data)};

const char* const kClassNames[kNumClasses] = {{
{labels}
}};

}}  // namespace {ns}
"""
    atomic_write(header, lambda fh: fh.write(hdr.encode()))
    atomic_write(source, lambda fh: fh.write(src.encode()))
    return header, source
