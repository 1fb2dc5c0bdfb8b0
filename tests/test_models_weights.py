"""Checkpoints: the shared fixtures (published and PaddleClas formats), other sources, strictness, cache."""

import hashlib
import json
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from helpers import SHARED_FIXTURES as FIXTURES

from micronet_torch import create_model
from micronet_torch.checkpoints import (
    CheckpointError,
    checkpoint_metadata,
    fetch_pretrained,
    read_pdparams,
    read_state_dict,
    save_safetensors,
)
from micronet_torch.cli import main as cli_main

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
    from micronet_torch.checkpoints import pretrained as registry

    src = FIXTURES / "paddleclas/MicroNet_M0_random.pdparams"
    monkeypatch.setitem(registry.PADDLECLAS_URLS, "micronet_m0", src.as_uri())
    monkeypatch.setitem(registry.PADDLECLAS_SHA256, "micronet_m0", hashlib.sha256(src.read_bytes()).hexdigest())
    model = create_model("micronet_m0", pretrained=True).eval()
    cached = tmp_path / "cache" / "micronet_m0.safetensors"
    assert cached.is_file() and (tmp_path / "cache" / "MicroNet_M0_pretrained.pdparams").is_file()
    io = np.load(FIXTURES / "paddleclas/MicroNet_M0_random_io.npz")
    with torch.no_grad():
        assert _rel_err(model(torch.from_numpy(io["input"])), torch.from_numpy(io["logits"])) <= TOL
    assert fetch_pretrained("micronet_m0") == cached  # second time: from the cache, no download


def test_pretrained_true_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    from micronet_torch.checkpoints import pretrained as registry

    monkeypatch.setitem(registry.PADDLECLAS_URLS, "micronet_m1", (tmp_path / "absent.pdparams").as_uri())
    monkeypatch.setitem(registry.PADDLECLAS_SHA256, "micronet_m1", "0" * 64)
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


# ---- verified downloads ---------------------------------------------------------------------------------
def test_download_needs_a_known_sha256_and_keeps_only_a_match(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MICRONET_TRUST_UNVERIFIED_DOWNLOAD", raising=False)
    from micronet_torch.checkpoints import pretrained as registry

    src = FIXTURES / "paddleclas/MicroNet_M0_random.pdparams"
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.PADDLECLAS_URLS, "micronet_m0", src.as_uri())
    monkeypatch.setitem(registry.PADDLECLAS_SHA256, "micronet_m0", None)
    with pytest.raises(CheckpointError, match=r"no SHA-256 is recorded.*MICRONET_TRUST_UNVERIFIED_DOWNLOAD=1"):
        fetch_pretrained("micronet_m0")
    cache = tmp_path / "cache"
    assert not cache.exists() or not list(cache.iterdir())
    with pytest.raises(CheckpointError, match=f"SHA-256 {good}, expected {'1' * 64}.*deleted"):
        fetch_pretrained("micronet_m0", sha256="1" * 64)
    assert not list(cache.iterdir())  # a substituted download never enters the cache
    monkeypatch.setenv("MICRONET_TRUST_UNVERIFIED_DOWNLOAD", "1")
    assert fetch_pretrained("micronet_m0").is_file()
    assert "without a SHA-256 check" in capsys.readouterr().err


def test_cached_file_that_fails_its_check_or_does_not_parse_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    from micronet_torch.checkpoints import pretrained as registry

    cache = tmp_path / "cache"
    cache.mkdir()
    paddle = cache / "MicroNet_M0_pretrained.pdparams"
    paddle.write_bytes(b"truncated")
    monkeypatch.setitem(registry.PADDLECLAS_SHA256, "micronet_m0", "2" * 64)
    with pytest.raises(CheckpointError, match="was deleted"):
        fetch_pretrained("micronet_m0")
    assert not paddle.exists()
    paddle.write_bytes(b"truncated")
    monkeypatch.setitem(registry.PADDLECLAS_SHA256, "micronet_m0", None)  # no hash: it is parsed, and fails
    with pytest.raises(CheckpointError, match=r"was in the cache but is not micronet_m0's weights.*deleted"):
        fetch_pretrained("micronet_m0")
    assert not paddle.exists()
    (cache / "micronet_m0.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="deleted from the cache"):
        create_model("micronet_m0", pretrained=True)
    assert not (cache / "micronet_m0.safetensors").exists()


# ---- crafted files: one-line errors -------------------------------------------------------------------
def _safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        ({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, bytes(8), "needs 4000"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, bytes(8), "outside the file"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(16), "bytes after the last"),
        ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "not a plain numeric"),
        ({"__metadata__": {"a": 1}}, b"", "metadata is not a map of strings"),
    ],
)
def test_lying_safetensors_header_is_one_line(tmp_path, header, body, reason):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors(header, body))
    with pytest.raises(CheckpointError, match=reason) as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    path.write_bytes(struct.pack("<Q", 2**50) + b"{}")
    with pytest.raises(CheckpointError, match="the header claims"):
        read_state_dict(path)


def test_rank1_stem_and_chosen_code_are_refused(tmp_path):
    from micronet_torch.checkpoints import load_model

    sd = _random_model("micronet_m0").state_dict()
    torch.save({**sd, "features.0.stem.0.conv.0.weight": torch.zeros(6)}, tmp_path / "rank1.pt")
    with pytest.raises(CheckpointError, match="has 1 dimensions, a MicroNet's has 4"):
        load_model(tmp_path / "rank1.pt")
    base = {"model": sd, "model_name": "micronet_m0", "num_classes": 1000, "in_chans": 3, "img_size": 224}
    base["class_names"] = [str(i) for i in range(1000)]
    cases = {
        "path.pt": ({"model_kwargs": {"checkpoint_path": "/etc/passwd"}}, "checkpoint_path, which this package"),
        "hub.pt": ({"model_name": "hf-hub:x/y"}, "does not build"),
        "obj.pt": ({"model_kwargs": {"activation": ["dsm"]}}, "not plain values"),
        "config.pt": ({"config": {"model": "micronet_m0", "model_kwargs": {"pretrained_cfg": "x"}}}, "saved config"),
    }
    for name, (extra, reason) in cases.items():
        torch.save({**base, **extra}, tmp_path / name)
        with pytest.raises(CheckpointError, match=reason):
            load_model(tmp_path / name)
    from micronet_torch.train.checkpoint import load as resume_load  # --resume reads through the same reader

    with pytest.raises(CheckpointError, match="saved config"):
        resume_load(tmp_path / "config.pt")


def test_convert_refuses_other_outputs_and_non_checkpoints(tmp_path, capsys):
    src = FIXTURES / "paddleclas/MicroNet_M0_random.pdparams"
    assert cli_main(["convert", str(src), str(tmp_path / "b.onnx")]) == 2
    assert ".safetensors" in capsys.readouterr().err and not (tmp_path / "b.onnx").exists()
    (tmp_path / "notes.txt").write_text("meeting notes\n")
    assert cli_main(["convert", str(tmp_path / "notes.txt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint this package reads: a text file" in err


def test_convert_output_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "m0.safetensors"
        assert cli_main(["convert", str(FIXTURES / "paddleclas/MicroNet_M0_random.pdparams"), str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


# ---- the head and the model named -----------------------------------------------------------------------
def test_reset_classifier_keeps_the_models_mode():
    model = create_model("micronet_m0").eval()
    model.reset_classifier(5)
    assert not model.get_classifier().training
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)  # BatchNorm1d in eval mode: batch 1 works
    model.train().reset_classifier(4)
    assert model.get_classifier().training


def test_pretrained_file_of_another_model_names_the_flag():
    with pytest.raises(CheckpointError) as err:
        create_model("micronet_m1", pretrained=FIXTURES / "official/micronet-m0-official-random.pth.tar")
    assert "looks like a micronet_m0" in str(err.value) and "--model micronet_m0" in str(err.value)
    assert "\n" not in str(err.value)


# ---- convert keeps what evaluation needs --------------------------------------------------------------
def test_converted_file_evaluates_and_predicts_like_the_checkpoint(tmp_path, capsys, trained, tiny_folder):
    from micronet_torch.checkpoints import load_model

    conv = tmp_path / "b.safetensors"
    assert cli_main(["convert", str(trained / "best.pt"), str(conv)]) == 0
    assert "20 px" in capsys.readouterr().out
    results = []
    for ck in (trained / "best.pt", conv):
        assert cli_main(["eval", "-c", str(ck), "--data", str(tiny_folder), "--json", "--workers", "0"]) == 0
        captured = capsys.readouterr()
        assert "records no preprocessing" not in captured.err
        results.append(json.loads(captured.out))
    assert results[1]["top1"] == results[0]["top1"] and results[1]["n"] == results[0]["n"] == 12
    a, b = load_model(trained / "best.pt"), load_model(conv)
    assert b.class_names == a.class_names == ["circle", "cross", "stripes"]
    assert b.data_config.to_dict() == a.data_config.to_dict() and b.data_config.img_size == 20
    image = str(sorted((tiny_folder / "val" / "cross").glob("*.png"))[0])
    assert cli_main(["predict", "-c", str(conv), image, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == {"circle", "cross", "stripes"}


def test_load_model_says_when_preprocessing_was_assumed(tmp_path, capsys):
    from micronet_torch.checkpoints import load_model

    save_safetensors(create_model("micronet_m0", num_classes=3), tmp_path / "bare.safetensors", "micronet_m0")
    loaded = load_model(tmp_path / "bare.safetensors")
    err = capsys.readouterr().err
    assert loaded.data_config.img_size == 224
    assert err.count("\n") == 1 and "records no preprocessing" in err and "224 px" in err
