"""The machine the package runs on: cache root, CPU name, cores, CPU threads and the training device.

One module for every place that asks "where do files go" or "what is this machine", so that the cache
root (``$MICRONET_TORCH_HOME``), the core count and the device rule are decided once.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__version__ = "0.2.0"

# images of at most this many pixels a side take the small-image pipeline (and one CPU thread on 2 cores)
SMALL_IMAGE_MAX = 64


class DeviceError(ValueError):
    """A device name that cannot be used here; the message says what to pass instead."""


def cache_root() -> Path:
    """Where the package keeps what it downloads or builds: ``$MICRONET_TORCH_HOME`` or ``~/.cache/micronet_torch``."""
    return Path(os.environ.get("MICRONET_TORCH_HOME", Path.home() / ".cache" / "micronet_torch"))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(img_size: int, processes: int = 1) -> int:
    """CPU threads per process. MicroNet's ops on small images are too small to split: on 2 cores a
    second thread gains ~1.4x when the machine is idle but loses 10-80x when another process takes a
    core (OpenMP threads spin at every op), so small images use 1 thread there, at most 4 elsewhere."""
    cores = max(1, available_cores() // processes)
    if img_size <= SMALL_IMAGE_MAX:
        return 1 if cores <= 2 else min(4, cores)
    return cores


def default_workers() -> int:
    """DataLoader workers when not given: the cores this process may use, less one for the model, max 8."""
    return max(1, min(8, available_cores() - 1))


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA when present, else the CPU; 'cuda' under torchrun means cuda:LOCAL_RANK."""
    import torch  # here, not at the top: the package's start-up (``micronet --help``) imports this module

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is visible (use --device cpu)")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"--device {name!r} is not a device torch knows ({err})") from err
