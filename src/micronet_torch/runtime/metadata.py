"""What a user needs to run an exported file without this package, as string key/value metadata.

Every format with a metadata place gets the same entries (OpenVINO ``rt_info``, ExecuTorch constant methods
for the numeric ones, a ``.json`` next to LiteRT / ncnn / ExecuTorch files): the input's name and size, the
preprocessing (mean, std, resize and crop), the class names, the model name and the package version.
"""

from __future__ import annotations

import json

from .._env import __version__
from ..models import LoadedModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_metadata(loaded: LoadedModel) -> dict[str, str]:
    """The metadata of ``loaded``'s export; lists are JSON text, so every value is a string any format stores."""
    cfg = loaded.data_config
    in_chans = getattr(loaded.model, "in_chans", cfg.in_chans)
    return {
        "model": loaded.name,
        "micronet_torch_version": __version__,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": json.dumps([in_chans, cfg.img_size, cfg.img_size]),
        "input_layout": "NCHW, float32, RGB in [0, 1] then (x - mean) / std",
        "mean": json.dumps(list(cfg.mean)),
        "std": json.dumps(list(cfg.std)),
        "resize": json.dumps({"policy": cfg.policy, "resize_size": cfg.resize_size, "crop_pct": cfg.crop_pct}),
        "class_names": json.dumps(list(loaded.class_names)),
    }
