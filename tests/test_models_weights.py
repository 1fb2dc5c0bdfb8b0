"""Checkpoints: the shared fixtures (published and PaddleClas formats), other sources, strictness, cache."""

import pickle
import re

import numpy as np
import pytest
import torch
from helpers import SHARED_FIXTURES as FIXTURES

from micronet_torch import create_model
from micronet_torch.cli import main as cli_main
from micronet_torch.models import (
    CheckpointError,
    checkpoint_metadata,
    fetch_pretrained,
    read_pdparams,
    read_state_dict,
    save_safetensors,
)

TOL = 2e-5


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("m", ["m0", "m2"])
def test_official_fixture_logits(m):
    io = torch.load(FIXTURES / f"official/micronet-{m}-official-io.pt", weights_only=True)
    model = create_model(f"micronet_{m}", pretrained=FIXTURES / f"official/micronet-{m}-official-random.pth.tar")
    model.eval()
    with torch.no_grad():
        x = io["input"]
        for i, block in enumerate(model.features):  # each stage too, so a mismatch names its block
            x = block(x)
            assert _rel_err(x, io["features"][i]) <= TOL, f"features.{i}"
        out = model(io["input"])
    assert _rel_err(out, io["logits"]) <= TOL


@pytest.mark.parametrize("m", ["M0", "M2"])
def test_paddleclas_fixture_logits(m):
    io = np.load(FIXTURES / f"paddleclas/MicroNet_{m}_random_io.npz")
    model = create_model(f"micronet_{m.lower()}", pretrained=FIXTURES / f"paddleclas/MicroNet_{m}_random.pdparams")
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(io["input"]))
    assert _rel_err(out, torch.from_numpy(io["logits"])) <= TOL


def _random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.1)
    return model


def _write_published(model, path):
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 600, "arch": "MicroNet", "state_dict": sd, "best_prec1": 0.0}, path)


def _write_pdparams(model, path):
    raw = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        arr = v.numpy()
        if k.endswith("running_mean"):
            k = k[: -len("running_mean")] + "_mean"
        elif k.endswith("running_var"):
            k = k[: -len("running_var")] + "_variance"
        elif arr.ndim == 2:
            arr = arr.T
        raw[k] = np.ascontiguousarray(arr)
    raw["StructuredToParameterName@@"] = {"a": "b"}
    with open(path, "wb") as fh:
        pickle.dump(raw, fh, protocol=4)


@pytest.mark.parametrize("name", ["micronet_m1", "micronet_m3"])
@pytest.mark.parametrize("fmt", ["published", "paddle", "bare", "safetensors"])
def test_m1_m3_files_of_every_format_round_trip(name, fmt, tmp_path):
    src = _random_model(name, seed=3)
    path = (
        tmp_path
        / {"published": "x.pth.tar", "paddle": "x.pdparams", "bare": "x.pt", "safetensors": "x.safetensors"}[fmt]
    )
    if fmt == "published":
        _write_published(src, path)
    elif fmt == "paddle":
        _write_pdparams(src, path)
    elif fmt == "bare":
        torch.save(src.state_dict(), path)
    else:
        save_safetensors(src, path, name)
    model = create_model(name, pretrained=path).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-6


def test_pdparams_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pdparams"
    with open(path, "wb") as fh:
        pickle.dump({"x": print}, fh)
    with pytest.raises(CheckpointError, match=r"refusing builtins\.print"):
        read_pdparams(path)


def test_wrong_model_is_named(tmp_path):
    with pytest.raises(CheckpointError) as err:
        create_model("micronet_m2", pretrained=FIXTURES / "official/micronet-m0-official-random.pth.tar")
    msg = str(err.value)
    assert "does not fit micronet_m2" in msg and "looks like a micronet_m0" in msg
    assert "features.0.stem.0.conv.0.weight: file has shape [2, 3, 3, 1], the model needs [4, 3, 3, 1]" in msg


def test_missing_and_unexpected_tensors_are_errors(tmp_path):
    sd = _random_model("micronet_m0").state_dict()
    extra = dict(sd, **{"features.1.bogus": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="1 file tensors unknown to the model"):
        create_model("micronet_m0", pretrained=tmp_path / "extra.pt")
    sd.pop("features.3.layers.1.fc.0.weight")
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=re.escape("missing from the file, e.g. features.3.layers.1.fc.0.weight")):
        create_model("micronet_m0", pretrained=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        create_model("micronet_m0", pretrained=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint this package reads: a text file"):
        create_model("micronet_m0", pretrained=tmp_path / "junk.pt")


def test_finetune_head_and_in_chans(tmp_path):
    src = _random_model("micronet_m0")
    ck = FIXTURES / "official/micronet-m0-official-random.pth.tar"
    model = create_model("micronet_m0", pretrained=ck, num_classes=10, in_chans=1)
    ref = create_model("micronet_m0", pretrained=ck)
    assert model.num_classes == 10 and model.get_classifier().out_features == 10
    torch.testing.assert_close(model.features[3].layers[0].conv[0].weight, ref.features[3].layers[0].conv[0].weight)
    assert model.features[0].stem[0].conv[0].weight.shape[1] == 1
    # a 10-class file loads its own head when num_classes is left alone
    save_safetensors(model, tmp_path / "ten.safetensors", "micronet_m0")
    again = create_model("micronet_m0", pretrained=tmp_path / "ten.safetensors", in_chans=1)
    assert again.num_classes == 10
    torch.testing.assert_close(again.get_classifier().linear[0].weight, model.get_classifier().linear[0].weight)
    assert src is not None


def test_training_checkpoint_layout_loads(tmp_path):
    src = _random_model("micronet_m0")
    torch.save({"model": src.state_dict(), "model_name": "micronet_m0", "epoch": 3}, tmp_path / "last.pt")
    assert len(read_state_dict(tmp_path / "last.pt")) == len(src.state_dict())
    assert checkpoint_metadata(tmp_path / "last.pt")["model_name"] == "micronet_m0"


def test_convert_command_writes_named_safetensors(tmp_path, capsys):
    out = tmp_path / "m0.safetensors"
    assert cli_main(["convert", str(FIXTURES / "paddleclas/MicroNet_M0_random.pdparams"), str(out)]) == 0
    assert checkpoint_metadata(out)["model"] == "micronet_m0"
    assert "micronet_m0" in capsys.readouterr().out
    a = create_model("micronet_m0", pretrained=out).eval()
    b = create_model("micronet_m0", pretrained=FIXTURES / "paddleclas/MicroNet_M0_random.pdparams").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert cli_main(["convert", str(tmp_path / "none.pdparams"), str(out)]) == 2


def test_pretrained_true_downloads_converts_and_caches(tmp_path, monkeypatch):
    """The download path, offline: a file:// URL stands in for PaddleClas's server."""
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    from micronet_torch.models import pretrained as registry

    url = (FIXTURES / "paddleclas/MicroNet_M0_random.pdparams").as_uri()
    monkeypatch.setitem(registry.PADDLECLAS_URLS, "micronet_m0", url)
    model = create_model("micronet_m0", pretrained=True).eval()
    cached = tmp_path / "cache" / "micronet_m0.safetensors"
    assert cached.is_file() and (tmp_path / "cache" / "MicroNet_M0_pretrained.pdparams").is_file()
    io = np.load(FIXTURES / "paddleclas/MicroNet_M0_random_io.npz")
    with torch.no_grad():
        assert _rel_err(model(torch.from_numpy(io["input"])), torch.from_numpy(io["logits"])) <= TOL
    assert fetch_pretrained("micronet_m0") == cached  # second time: from the cache, no download


def test_pretrained_true_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    from micronet_torch.models import pretrained as registry

    monkeypatch.setitem(registry.PADDLECLAS_URLS, "micronet_m1", (tmp_path / "absent.pdparams").as_uri())
    with pytest.raises(CheckpointError) as err:
        create_model("micronet_m1", pretrained=True)
    assert str(tmp_path / "cache" / "MicroNet_M1_pretrained.pdparams") in str(err.value)
    assert not list((tmp_path / "cache").glob(".*.tmp"))
    with pytest.raises(CheckpointError, match="no published ImageNet weights"):
        create_model("micronet_v1_m3", pretrained=True)


def test_timm_pretrained_with_local_file_and_features_only():
    import timm

    path = str(FIXTURES / "official/micronet-m0-official-random.pth.tar")
    model = timm.create_model("micronet_m0", pretrained=True, pretrained_cfg_overlay={"file": path}, num_classes=5)
    ref = create_model("micronet_m0", pretrained=path)
    torch.testing.assert_close(model.features[2].layers[0].conv[0].weight, ref.features[2].layers[0].conv[0].weight)
    assert model.num_classes == 5
    feats = timm.create_model("micronet_m0", pretrained=True, pretrained_cfg_overlay={"file": path}, features_only=True)
    assert len(feats(torch.randn(1, 3, 64, 64))) == 5
