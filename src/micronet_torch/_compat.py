"""Old import paths: the flat layout's (0.1) and the checkpoint modules that moved from ``models`` to ``checkpoints``.

``micronet_torch.model``, ``.weights``, ``.export``, ``.engine`` and ``.fused_ops`` still import (with a
``DeprecationWarning`` for the first four; ``fused_ops`` is public surface) as views of the modules that now
hold their names; any other module of the old layout raises ``ModuleNotFoundError`` naming its new home.
``micronet_torch.models.weights``, ``.pdparams``, ``.formats``, ``.loader``, ``.pretrained``, ``.choices`` and
``.errors`` import quietly: the module itself where it moved whole, else a view of the modules that split it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

_PKG = __name__.rsplit(".", 1)[0]

# old module -> the modules that now hold its names, searched in order
ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("models.micronet",),
    "weights": (
        "checkpoints.state_dict",
        "checkpoints.readers",
        "checkpoints.strict",
        "checkpoints.save",
        "checkpoints.pretrained",
        "checkpoints.errors",
    ),
    "export": (
        "runtime.export",
        "runtime.onnx",
        "runtime.ort",
        "runtime.torch_export",
        "runtime.parity",
        "runtime.calibration",
    ),
    "engine": (
        "train.trainer",
        "train.config",
        "train.distributed",
        "train.metrics",
        "train.logs",
        "train.builders",
        "train.run_folder",
        "train.signals",
        "train.resume",
        "_env",
    ),
    "fused_ops": ("deploy.fused",),
}
QUIET = {"fused_ops"}  # public surface: no warning
# models.<old> -> the checkpoints modules that now hold its names (one: that module itself; several: a view)
SUBMODULES: dict[str, tuple[str, ...]] = {
    "weights": (
        "checkpoints.readers",
        "checkpoints.state_dict",
        "checkpoints.strict",
        "checkpoints.save",
        "checkpoints.choices",
        "checkpoints.files",
        "checkpoints.errors",
    ),
    "pdparams": ("checkpoints.pdparams", "checkpoints.state_dict", "checkpoints.files", "checkpoints.errors"),
    "formats": ("checkpoints.formats", "checkpoints.safetensors_header", "checkpoints.loader"),
    "loader": ("checkpoints.loader",),
    "pretrained": ("checkpoints.pretrained",),
    "choices": ("checkpoints.choices",),
    "errors": ("checkpoints.errors",),
}
MOVED = {
    "registry": "models.registry",
    "specs": "models.specs",
    "blocks": "models.blocks",
    "baselines": "models.baselines",
    "profiler": "models.profile",
    "checkpoint": "train.checkpoint",
    "evaluate": "tools.evaluate",
    "predict": "tools.predict",
    "bench": "tools.bench",
    "experiment": "tools.experiment",
    "demo": "tools.demo",
    "commands": "cli.models",
    "_onnxscript_ops": "kernels.onnx_translation",
}


class _AliasModule(types.ModuleType):
    """A module whose attributes are looked up in the modules that now hold them."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name)
        self.__targets = targets

    def __getattr__(self, attr: str) -> Any:
        for target in self.__targets:
            module = importlib.import_module(f"{_PKG}.{target}")
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"{self.__name__} has no {attr!r} (it moved to {', '.join(self.__targets)})")


class _SameModule(importlib.abc.Loader):
    """Loads an old name as the very module that moved (one object: attributes set on either are on both)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(f"{_PKG}.{self.target}")
        self.spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # the import system stamped the old name's spec on it; give it back its own


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, old = fullname.rpartition(".")
        if prefix == f"{_PKG}.models" and old in SUBMODULES:
            targets = SUBMODULES[old]
            if len(targets) == 1:
                return importlib.machinery.ModuleSpec(fullname, _SameModule(targets[0]))
            return importlib.machinery.ModuleSpec(fullname, self)
        if prefix != _PKG:
            return None
        if old in ALIASES:
            return importlib.machinery.ModuleSpec(fullname, self)
        if old in MOVED:
            raise ModuleNotFoundError(
                f"{fullname} moved to {_PKG}.{MOVED[old]} in micronet-torch 0.2 (docs/architecture.md)", name=fullname
            )
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        prefix, _, old = spec.name.rpartition(".")
        if prefix != _PKG:  # a split module of models/: quiet
            return _AliasModule(spec.name, SUBMODULES[old])
        if old not in QUIET:
            new = ", ".join(f"{_PKG}.{t}" for t in ALIASES[old])
            warnings.warn(f"{spec.name} is deprecated; import from {new}", DeprecationWarning, stacklevel=2)
        return _AliasModule(spec.name, ALIASES[old])

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``name`` is imported, lets the other finders find it and runs ``callback``
    once its module has been executed (a post-import hook)."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and never in the way of the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenLoader(spec.loader, self.callback)
        return spec


class _ThenLoader(importlib.abc.Loader):
    """``loader``, then ``callback``; the module keeps the original loader."""

    def __init__(self, loader: Any, callback: Callable[[], None]) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.loader, attr)


def after_import(name: str, callback: Callable[[], None]) -> None:
    """Run ``callback`` right after the top-level module ``name`` is first imported (not yet imported now)."""
    sys.meta_path.insert(0, _AfterImport(name, callback))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
