"""What several test modules share: where the shared fixtures are, the ablation variants, a deadline."""

import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import micronet_torch
from micronet_torch.deploy.fused import FusedOpsUnavailable
from micronet_torch.runtime import TARGETS

ROOT = Path(__file__).resolve().parents[1]

# ../shared beside the repository (CI clones the repo next to a copy of it), else a shared/ inside it
SHARED_FIXTURES = next(
    (p for p in (ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures") if p.is_dir()),
    ROOT / "shared" / "fixtures",
)


def official_model_and_io(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """micronet_<name> from its published-format fixture (eval mode) and the fixture's recorded input and logits;
    skips the test when the fixtures are not there."""
    official = SHARED_FIXTURES / "official"
    ckpt, io = official / f"micronet-{name}-official-random.pth.tar", official / f"micronet-{name}-official-io.pt"
    if not ckpt.is_file():
        pytest.skip("fixtures not available")
    model = micronet_torch.create_model(f"micronet_{name}", pretrained=str(ckpt)).eval()
    return model, torch.load(io, weights_only=True)


# every ablation Variant of the model library (blocks.Variant), one field changed each
ABLATION_VARIANTS = [
    dict(activation="relu"),
    dict(activation="se"),
    dict(activation="dsm_j1"),
    dict(depthwise="full"),
    dict(pointwise="plain"),
    dict(shift="group"),
]


def runtime_library_or_skip(fmt: str, build) -> str:
    """The path ``build()`` returns for a runtime's fused-operator library, or a skip naming why there is none
    (the runtime ``fmt`` not installed, no compiler)."""
    why = TARGETS[fmt].missing()
    if why:
        pytest.skip(why)
    try:
        return str(build())
    except FusedOpsUnavailable as err:
        pytest.skip(str(err))


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging forever) when the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
