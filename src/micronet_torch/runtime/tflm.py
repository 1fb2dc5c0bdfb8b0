"""TensorFlow Lite Micro's reference kernels on this host, always in a child process.

The ``tflite-micro`` wheel's Python interpreter runs a ``.tflite`` exactly as TFLM does on a board (its reference
kernels, its memory planner, its arena). A model it cannot run may crash it (a native fault, not an exception), so
every run happens in a child process: a crash becomes a ``TflmError`` naming the signal, never a dead caller.
The child also reports TFLM's own arena accounting (``RecordingMicroAllocator``): the head is what the memory
planner lays out for the activations, the tail what stays for the model's life (tensor and node records,
quantization parameters, kernels' persistent data). ``python -m micronet_torch.runtime.tflm`` is the child.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .result import ConversionError

EXTRA = "pip install micronet-torch[mcu]"
DEFAULT_ARENA = 4 << 20  # bytes: enough for every registered model up to 224^2; the used part is what counts
_ALLOC = re.compile(r"Arena allocation (total|head|tail) (\d+) bytes")


class TflmError(ConversionError):
    """TFLM refused or crashed on a model; the message names the file and what happened (``micronet`` prints it as
    one line, like a converter's refusal)."""


@dataclass
class TflmRun:
    """What one child run measured: outputs per model, arena use (bytes) and per-image latencies (s)."""

    outputs: list[np.ndarray]
    arena: list[dict[str, int]] = field(default_factory=list)  # {"total", "head", "tail"} per model
    latency: list[list[float]] = field(default_factory=list)  # per model, one entry per timed round


def run_tflm(
    models: list[str | os.PathLike],
    inputs: list[np.ndarray],
    arena_size: int = DEFAULT_ARENA,
    rounds: int = 0,
    timeout: float = 600.0,
) -> TflmRun:
    """Run each ``models[i]`` on ``inputs[i]`` (a batch: the first axis is run image by image) in one child
    process; with ``rounds`` > 0 also time that many single-image invocations per model, interleaved.

    Raises ``TflmError`` when the child fails: a crash (the signal named), TFLM refusing the model (its log
    quoted), or the timeout.
    """
    with tempfile.TemporaryDirectory(prefix="micronet-tflm-") as tmp:
        tmpdir = Path(tmp)
        spec = {"models": [], "arena_size": int(arena_size), "rounds": int(rounds)}
        for i, (model, x) in enumerate(zip(models, inputs, strict=True)):
            np.save(tmpdir / f"in{i}.npy", np.ascontiguousarray(x))
            spec["models"].append({"path": str(Path(model).resolve()), "input": str(tmpdir / f"in{i}.npy")})
        (tmpdir / "spec.json").write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "micronet_torch.runtime.tflm", str(tmpdir)]
        env = {**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as err:
            raise TflmError(f"TFLM did not finish {_names(models)} within {timeout:.0f} s") from err
        if proc.returncode != 0:
            raise TflmError(_failure(models, proc))
        result = json.loads((tmpdir / "result.json").read_text())
        outputs = [np.load(tmpdir / f"out{i}.npy") for i in range(len(models))]
    return TflmRun(outputs, result["arena"], result["latency"])


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _names(models: list[str | os.PathLike]) -> str:
    return ", ".join(Path(m).name for m in models)


def _failure(models: list[str | os.PathLike], proc: subprocess.CompletedProcess) -> str:
    rc = proc.returncode
    what = f"crashed with {signal.Signals(-rc).name}" if rc < 0 else f"failed (exit {rc})"
    tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-6:]
    return f"TFLM {what} on {_names(models)}" + (": " + " | ".join(tail) if tail else "")


def _interpreter(path: str, arena_size: int):
    try:
        from tflite_micro.python.tflite_micro import runtime  # optional native dependency: only in the child
    except ImportError as err:
        raise SystemExit(f"TFLM needs the tflite-micro package: {EXTRA}") from err
    return runtime.Interpreter.from_file(path, arena_size=arena_size)


def _arena(interp) -> dict[str, int]:
    """TFLM's own accounting, which it prints on the C++ side's stderr: read back through a pipe."""
    read, write = os.pipe()
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(write, 2)
    try:
        interp.print_allocations()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    return {k: int(v) for k, v in _ALLOC.findall(text)}


def _child(folder: Path) -> None:
    spec = json.loads((folder / "spec.json").read_text())
    interps, xs = [], []
    for m in spec["models"]:
        interps.append(_interpreter(m["path"], spec["arena_size"]))
        xs.append(np.load(m["input"]))
    arena = []
    for i, (interp, x) in enumerate(zip(interps, xs, strict=True)):
        outs = []
        for img in x:
            interp.set_input(img[None], 0)
            interp.invoke()
            outs.append(interp.get_output(0).copy())
        np.save(folder / f"out{i}.npy", np.concatenate(outs) if outs else np.zeros(0))
        arena.append(_arena(interp))
    latency: list[list[float]] = [[] for _ in interps]
    for _ in range(spec["rounds"]):  # round robin: a change in machine load hits every model alike
        for i, (interp, x) in enumerate(zip(interps, xs, strict=True)):
            interp.set_input(x[:1], 0)
            t0 = time.perf_counter()
            interp.invoke()
            latency[i].append(time.perf_counter() - t0)
    (folder / "result.json").write_text(json.dumps({"arena": arena, "latency": latency}))


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
