"""The command line starts without torch: its parser is built from modules that import the library only to run."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "torchvision", "numpy")
CHECK = (
    "import sys\n"
    "from micronet_torch.cli.main import main\n"
    "for argv in {argvs!r}:\n"
    "    try:\n"
    "        main(argv)\n"
    "    except SystemExit:\n"
    "        pass\n"
    "print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))\n"
)


def heavy_imports(*argvs: list[str]) -> list[str]:
    code = CHECK.format(argvs=list(argvs), heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # the printed list


@pytest.mark.subprocess
def test_command_help_imports_no_torch() -> None:
    commands = ["train", "status", "experiment", "models", "profile", "convert", "demo", "bench", "bench-train"]
    assert heavy_imports(*([c, "--help"] for c in commands), ["experiment", "run", "--help"]) == []


@pytest.mark.subprocess
def test_package_import_loads_no_torch_and_still_registers_with_timm() -> None:
    code = (
        "import sys, micronet_torch\n"
        "assert 'torch' not in sys.modules\n"
        "import timm\n"  # the README's order: the package first, then timm
        "assert 'micronet_m3' in timm.list_models('micronet_*')\n"
        "print(type(timm.create_model('micronet_m0', num_classes=3)).__name__, micronet_torch.create_model.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["MicroNet", "create_model"], proc.stderr[-2000:]


@pytest.mark.subprocess
def test_top_level_help_imports_no_torch() -> None:
    assert heavy_imports(["--help"]) == []


def test_ops_imported_before_timm_still_registers_with_timm() -> None:
    """timm first imported while ``ops`` is importing must not run the timm registration against a half-made
    ``ops`` (a circular import): the operators import timm on first use only."""
    code = (
        "import micronet_torch\n"
        "from micronet_torch.ops import DynamicShiftMax\n"
        "import timm\n"
        "assert type(timm.create_model('micronet_m0')).__name__ == 'MicroNet'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
