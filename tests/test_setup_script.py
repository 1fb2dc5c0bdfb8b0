"""``scripts/setup.sh`` takes torch from ``TORCH_SPEC`` / ``MICRONET_TORCH_INDEX_URL``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def run_setup(tmp_path: Path, **env: str) -> list[str]:
    """Run setup.sh in a copy of the repository with stub ``.venv/bin/{python,pip}`` that log their arguments."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, repo / "scripts" / "setup.sh")
    venv = repo / ".venv" / "bin"
    venv.mkdir(parents=True)
    log = tmp_path / "calls.log"
    for name, rc in (("pip", 0), ("python", 1)):  # python: "torch is not installed yet" for the version probe
        stub = venv / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\ncase "$*" in *print*) exit 0;; esac\nexit {rc}\n')
        stub.chmod(0o755)
    tools = tmp_path / "tools"  # no apt-get on PATH: nothing gets installed system-wide
    tools.mkdir()
    for tool in ("dirname", "id", "grep", "cat", "sh"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), tools / tool)
    (tools / "cc").write_text("#!/bin/sh\nexit 0\n")
    (tools / "cc").chmod(0o755)
    bash = shutil.which("bash")
    full_env = {"PATH": str(tools), "HOME": str(tmp_path), **env}
    subprocess.run([bash, str(repo / "scripts" / "setup.sh")], check=True, env=full_env, capture_output=True)
    return log.read_text().splitlines()


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_setup_takes_the_torch_source_from_the_environment(tmp_path: Path) -> None:
    calls = run_setup(tmp_path / "a")
    assert any(c.startswith("pip install") and "torch==2.14.1 torchvision==0.29.1" in c for c in calls)
    assert not any("--index-url" in c for c in calls)
    cpu = "https://download.pytorch.org/whl/cpu"
    calls = run_setup(tmp_path / "b", MICRONET_TORCH_INDEX_URL=cpu, TORCH_SPEC="torch==2.14.1")
    torch_call = next(c for c in calls if c.startswith("pip install") and "torch==" in c)
    assert f"--index-url {cpu}" in torch_call and "torchvision" not in torch_call
