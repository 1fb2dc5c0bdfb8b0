"""Constants several test modules share: where the shared fixtures are, and the ablation variants."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ../shared beside the repository (CI clones the repo next to a copy of it), else a shared/ inside it
SHARED_FIXTURES = next(
    (p for p in (ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures") if p.is_dir()),
    ROOT / "shared" / "fixtures",
)

# every ablation Variant of the model library (blocks.Variant), one field changed each
ABLATION_VARIANTS = [
    dict(activation="relu"),
    dict(activation="se"),
    dict(activation="dsm_j1"),
    dict(depthwise="full"),
    dict(pointwise="plain"),
    dict(shift="group"),
]
