"""What every exported file carries, so that it runs right without micronet-torch and without ``best.pt``.

``export_metadata(loaded)`` is the one dictionary (string keys and values) each exporter writes in its
format's metadata place: ONNX ``metadata_props``, TorchScript / torch.export extra files, OpenVINO ``rt_info``,
ExecuTorch constant methods (the numeric entries), a ``.json`` beside LiteRT / ncnn / ExecuTorch files.
``read_onnx_metadata``, ``read_openvino_metadata``, ``read_json_beside`` and ``read_archive_metadata`` read it back
(``micronet eval`` / ``predict`` of an exported file, and the check that an export only replaces its own files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._env import __version__
from .._fs import atomic_write
from ..data import DataConfig
from ..models import LoadedModel

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MAX_METADATA_BYTES = 1 << 20  # metadata read from a file: class names of any real data set fit


def export_metadata(
    loaded: LoadedModel, input_name: str = INPUT_NAME, batch: str | int | None = None
) -> dict[str, str]:
    """Class names (JSON), input name and size ((C, H, W), or (batch, C, H, W) when ``batch`` is given: ONNX files
    have a dynamic batch axis), mean/std, the resize, the model name, the package version and the data config."""
    cfg = loaded.data_config
    in_chans = getattr(loaded.model, "in_chans", cfg.in_chans)
    size = [int(in_chans), int(cfg.img_size), int(cfg.img_size)]
    return {
        "model_name": str(loaded.name),
        "model": str(loaded.name),
        "class_names": json.dumps(list(loaded.class_names)),
        "input_name": input_name,
        "output_name": OUTPUT_NAME,
        "input_size": json.dumps(size),
        "input_layout": "NCHW, float32, RGB in [0, 1] then (x - mean) / std",
        "mean": json.dumps(per_channel(cfg.mean, in_chans)),
        "std": json.dumps(per_channel(cfg.std, in_chans)),
        "resize": json.dumps(
            {"policy": cfg.policy, "img_size": cfg.img_size, "crop_pct": cfg.crop_pct, "resize_size": cfg.resize_size}
        ),
        "data_config": json.dumps(cfg.to_dict()),
        "micronet_torch_version": __version__,
    }


def per_channel(values: tuple[float, ...] | list[float], chans: int) -> list[float]:
    """Mean or std as one value per input channel, as ``data.normalize`` applies them (grey: the average)."""
    values = [float(v) for v in values]
    if len(values) == chans:
        return values
    if chans == 1:
        return [sum(values) / len(values)]
    return (values * chans)[:chans] if len(values) == 1 else values[:chans]


def write_onnx_metadata(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Set ``meta`` as the ONNX file's ``metadata_props`` (replacing keys of the same name), in place."""
    import onnx  # heavy: only when exporting ONNX

    model = onnx.load(str(path))
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``metadata_props`` as a dict (empty for files exported without them)."""
    import onnx  # heavy: only when reading ONNX

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def data_config_from_metadata(meta: dict[str, Any]) -> DataConfig | None:
    """The recorded preprocessing, or None when the file has none."""
    if "data_config" not in meta:
        return None
    return DataConfig.from_dict(json.loads(meta["data_config"]))


def sidecar(path: str | os.PathLike) -> Path:
    """The ``.json`` beside an exported file that has no metadata place of its own: its full name plus ``.json``
    (``m0.pte.json``, ``m0.tflite.json``, ``m0.param.json``), so exports of two formats that share a stem never
    share a sidecar."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_json_beside(path: str | os.PathLike, metadata: dict[str, Any] | None) -> None:
    """``metadata`` as the ``sidecar`` of an exported file (LiteRT, ncnn, ExecuTorch), written atomically;
    nothing when there is none."""
    if metadata:
        text = json.dumps(metadata, indent=1).encode()
        atomic_write(sidecar(path), lambda fh: fh.write(text))


def read_json_beside(path: str | os.PathLike) -> dict[str, str]:
    """The metadata in an exported file's ``sidecar`` (empty when there is none); ``ValueError`` names a sidecar
    that is not a JSON object of strings."""
    side = sidecar(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_bytes()[:MAX_METADATA_BYTES])
    except ValueError as err:
        raise ValueError(f"{side} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{side} is not a JSON object of strings (the metadata micronet export writes)")
    return meta


def read_openvino_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``rt_info["micronet"]`` entries of an OpenVINO IR, read from its ``.xml`` without OpenVINO."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(Path(path).with_suffix(".xml")).getroot()
    except (ET.ParseError, OSError) as err:
        raise ValueError(f"{path} is not an OpenVINO IR ({err})") from err
    node = root.find("rt_info/micronet")
    return {} if node is None else {child.tag: child.get("value", "") for child in node}


def read_archive_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata.json`` extra file of a TorchScript or ``torch.export`` archive (a zip), read without torch."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("extra/metadata.json")), None)
            if name is None:
                return {}
            with archive.open(name) as fh:
                meta = json.loads(fh.read(MAX_METADATA_BYTES))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError(f"{path} is not an archive written by micronet export ({err})") from err
    return meta if isinstance(meta, dict) else {}
