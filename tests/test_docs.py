"""The Python examples in docs/usage.md run as written (the published file names point at fixtures)."""

import re
from pathlib import Path

import pytest
from helpers import SHARED_FIXTURES as FIXTURES

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "usage.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
STAND_INS = {
    '"MicroNet_M0_pretrained.pdparams"': repr(str(FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams")),
    '"micronet-m0.pth"': repr(str(FIXTURES / "official" / "micronet-m0-official-random.pth.tar")),
}


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_usage_example_runs(index):
    code = BLOCKS[index]
    for name, path in STAND_INS.items():
        code = code.replace(name, path)
    exec(compile("import micronet_torch\n" + code, f"usage.md[{index}]", "exec"), {})
