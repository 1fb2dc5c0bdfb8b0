"""The checkpoints package: its place in the layers, the one load path, pretrained weights trusted on first use,
and ``micronet convert`` refusing what it cannot write in one line."""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, SHARED_FIXTURES

import micronet_torch
from micronet_torch import checkpoints
from micronet_torch.checkpoints import CheckpointError, pretrained
from micronet_torch.cli import main as cli_main

SRC = ROOT / "src"
M0_PDPARAMS = SHARED_FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams"
M0_IO = SHARED_FIXTURES / "paddleclas" / "MicroNet_M0_random_io.npz"
M0_OFFICIAL = SHARED_FIXTURES / "official" / "micronet-m0-official-random.pth.tar"


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


# ---- layers -----------------------------------------------------------------------------------------
BY_NAME = """
import sys
import timm
import micronet_torch
from micronet_torch.models import build_model, create_model
create_model("micronet_m0", num_classes=3)
build_model("mobilenetv3_small_w0.35", num_classes=3)
timm.create_model("micronet_m1")
print(sorted(m for m in sys.modules if m.startswith("micronet_torch.checkpoints")))
create_model("micronet_m0", pretrained=sys.argv[1])
print("micronet_torch.checkpoints.pretrained" in sys.modules)
"""


@pytest.mark.subprocess
def test_building_by_name_imports_no_checkpoint_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", BY_NAME, str(M0_OFFICIAL)], capture_output=True, text=True, env=_child_env()
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_timm_registration_uses_only_timm_public_api() -> None:
    private = "_model_" + "entrypoints"  # timm's private registry (spelled apart so that a grep finds none)
    hits = [p for p in (SRC / "micronet_torch").rglob("*.py") if private in p.read_text()]
    assert hits == []
    import timm

    for name in micronet_torch.list_models():
        assert timm.is_model(name)
    entry = timm.models.model_entrypoint("micronet_m3")
    assert entry.__module__ == "micronet_torch.models.registry"


def test_one_door_to_build_every_kind_of_name() -> None:
    from micronet_torch.models import build_model, create_model

    assert build_model is create_model
    assert isinstance(create_model("micronet_v1_m0", num_classes=4), micronet_torch.MicroNet)
    assert create_model("mobilenetv3_small_w0.35", num_classes=5).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert create_model("resnet10t", num_classes=4, in_chans=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown model 'nonet'"):
        create_model("nonet")
    with pytest.raises(ValueError, match="only supported for MicroNets"):
        create_model("resnet10t", pretrained=str(M0_OFFICIAL))


def test_old_import_paths_are_the_moved_modules_or_views_of_them() -> None:
    import micronet_torch.models.choices as old_choices
    import micronet_torch.models.errors as old_errors
    import micronet_torch.models.formats as old_formats
    import micronet_torch.models.loader as old_loader
    import micronet_torch.models.pdparams as old_pdparams
    import micronet_torch.models.pretrained as old_pretrained
    import micronet_torch.models.weights as old_weights

    import micronet_torch.models as models
    from micronet_torch.checkpoints import choices, errors, loader, state_dict

    assert old_loader is loader and old_errors is errors and old_choices is choices and old_pretrained is pretrained
    assert loader.__spec__.name == "micronet_torch.checkpoints.loader"  # the moved module keeps its own spec
    assert models.load_model is checkpoints.load_model and models.CheckpointError is CheckpointError
    assert old_weights.read_state_dict is state_dict.read_state_dict
    assert old_weights.CLASSIFIER_PREFIX == "classifier.2." and callable(old_weights.is_training_checkpoint)
    assert old_weights.save_safetensors is checkpoints.save_safetensors and callable(old_weights.load_into)
    assert old_pdparams.read_pdparams is state_dict.read_pdparams and old_pdparams.MAX_BYTES_ENV
    assert callable(old_pdparams.parse_pdparams) and callable(old_pdparams.read_file_bounded)
    assert old_formats.parse_plain_json("[1]") == [1] and old_formats.sniff(b"PK\x03\x04") == "torch"
    assert callable(old_formats.check_safetensors)
    with pytest.raises(AttributeError, match="no_such_name"):
        models.no_such_name  # noqa: B018


# ---- one reader table, filter functions ---------------------------------------------------------------
def test_reader_table_and_filter_functions_are_keyed_by_format() -> None:
    assert set(checkpoints.READERS) == set(checkpoints.FILTERS) == {"torch", "safetensors", "pdparams"}
    w = torch.arange(6.0).reshape(2, 3)
    paddle = {"bn._mean": torch.zeros(2), "bn._variance": torch.ones(2), "fc.weight": w}
    model = torch.nn.Linear(2, 3)
    for fn in (checkpoints.paddleclas_filter_fn, checkpoints.checkpoint_filter_fn):
        out = fn(paddle, model)
        assert set(out) == {"bn.running_mean", "bn.running_var", "fc.weight"}
        assert torch.equal(out["fc.weight"], w.t())
    published = {"epoch": 1, "state_dict": {"module.a.weight": w, "module._orig_mod.b": w}}
    for fn in (checkpoints.published_filter_fn, checkpoints.checkpoint_filter_fn):
        assert list(fn(published, None)) == ["a.weight", "b"]
    with pytest.raises(CheckpointError, match=r"f\.pt: no state dict found"):
        checkpoints.published_filter_fn({"epoch": 1}, None, source="f.pt")


REGISTRY = "micronet_torch.models.registry"


def _module_entries(fn) -> list[str]:
    """The modules of ``checkpoints`` (and the registry) that ``fn`` enters, in order: each call into one of them
    from another module is one entry."""
    entries: list[str] = []

    def profile(frame, event, arg) -> None:
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
        if callee != caller and (callee.startswith("micronet_torch.checkpoints") or callee == REGISTRY):
            entries.append(callee.rpartition(".")[2])

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return entries


def _training_checkpoint(path: Path) -> Path:
    model = micronet_torch.create_model("micronet_m0", num_classes=3)
    obj = {"model": model.state_dict(), "model_name": "micronet_m0", "num_classes": 3, "in_chans": 3}
    obj.update(img_size=32, class_names=["a", "b", "c"], config={"model": "micronet_m0", "model_kwargs": {}})
    torch.save(obj, path)
    return path


def test_export_load_path_enters_each_module_once(tmp_path, capsys) -> None:
    """``micronet export -c FILE``'s load (``cli.export._loaded``): a pipeline, no module entered twice."""
    from micronet_torch.cli.export import _loaded

    safetensors = tmp_path / "m0.safetensors"
    checkpoints.save_safetensors(micronet_torch.create_model("micronet_m0"), safetensors, "micronet_m0")
    read = ["loader", "readers", "files", "formats"]  # torch.load runs inside readers
    fit = ["state_dict", "choices", "registry", "strict"]
    files = {
        "training": (_training_checkpoint(tmp_path / "best.pt"), [*read, "choices", "state_dict", "registry"]),
        "published": (M0_OFFICIAL, [*read, *fit]),
        "paddleclas": (M0_PDPARAMS, [*read, "pdparams", *fit]),
        "safetensors": (safetensors, [*read, "safetensors_header", *fit]),
    }
    for kind, (path, expected) in files.items():
        args = argparse.Namespace(checkpoint=str(path), model=None, img_size=None, num_classes=None, in_chans=None)
        assert _module_entries(lambda args=args: _loaded(args)) == expected, kind
    capsys.readouterr()


# ---- pretrained=True: downloads, hashes trusted on first use ------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty weights cache, M0 published at a file:// URL with no pinned hash."""
    monkeypatch.setenv("MICRONET_TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(pretrained.TRUST_ENV, raising=False)
    served = tmp_path / "served.pdparams"
    served.write_bytes(M0_PDPARAMS.read_bytes())
    monkeypatch.setitem(pretrained.PADDLECLAS_URLS, "micronet_m0", served.as_uri())
    monkeypatch.setitem(pretrained.PADDLECLAS_SHA256, "micronet_m0", None)
    return tmp_path / "cache"


def _logits_ok(model: torch.nn.Module) -> bool:
    io_ = np.load(M0_IO)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(io_["input"]))
    ref = torch.from_numpy(io_["logits"])
    return ((out - ref).abs().max() / ref.abs().max()).item() <= 2e-5


def test_pretrained_true_trusts_the_first_download_once_and_records_it(cache, capsys) -> None:
    assert _logits_ok(micronet_torch.create_model("micronet_m0", pretrained=True))
    err = capsys.readouterr().err
    assert err.count("trusting it on first use") == 1 and hashlib.sha256(M0_PDPARAMS.read_bytes()).hexdigest() in err
    record = json.loads((cache / "pretrained-sha256.json").read_text())["micronet_m0"]
    assert record["pdparams"] == hashlib.sha256(M0_PDPARAMS.read_bytes()).hexdigest()
    assert record["safetensors"] == hashlib.sha256((cache / "micronet_m0.safetensors").read_bytes()).hexdigest()
    assert _logits_ok(micronet_torch.create_model("micronet_m0", pretrained=True))  # later use: checked, quiet
    assert "first use" not in capsys.readouterr().err


def test_a_changed_cached_file_is_one_clear_error(cache, capsys) -> None:
    micronet_torch.create_model("micronet_m0", pretrained=True)
    converted = cache / "micronet_m0.safetensors"
    data = bytearray(converted.read_bytes())
    data[-1] ^= 1  # still a valid file, other numbers
    converted.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="recorded when it was written") as err:
        micronet_torch.create_model("micronet_m0", pretrained=True)
    assert "\n" not in str(err.value) and str(converted) in str(err.value) and not converted.exists()
    assert _logits_ok(micronet_torch.create_model("micronet_m0", pretrained=True))  # converted again, checked
    capsys.readouterr()


def test_a_later_download_must_match_the_recorded_hash(cache, tmp_path, capsys) -> None:
    micronet_torch.create_model("micronet_m0", pretrained=True)
    for name in ("micronet_m0.safetensors", "MicroNet_M0_pretrained.pdparams"):
        (cache / name).unlink()
    served = Path(pretrained.PADDLECLAS_URLS["micronet_m0"].removeprefix("file://"))
    served.write_bytes(M0_PDPARAMS.read_bytes() + b"\0")  # the server now sends other bytes
    with pytest.raises(CheckpointError, match="expected") as err:
        micronet_torch.create_model("micronet_m0", pretrained=True)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in cache.iterdir()) == ["pretrained-sha256.json"]  # nothing else was kept
    capsys.readouterr()


def test_pretrained_downloads_over_https(cache, monkeypatch, capsys) -> None:
    """The real URL and download code, with the network replaced by an opener that serves the file."""
    real = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/MicroNet_M0_pretrained.pdparams"
    monkeypatch.setitem(pretrained.PADDLECLAS_URLS, "micronet_m0", real)
    asked = []

    def opener(url, timeout=None):
        asked.append(url)
        return io.BytesIO(M0_PDPARAMS.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", opener)
    assert _logits_ok(micronet_torch.create_model("micronet_m0", pretrained=True))
    assert asked == [real]
    monkeypatch.setitem(pretrained.PADDLECLAS_URLS, "micronet_m1", "http://example.invalid/m1.pdparams")
    with pytest.raises(CheckpointError, match="https"):
        micronet_torch.create_model("micronet_m1", pretrained=True)
    assert asked == [real]
    capsys.readouterr()


# ---- micronet convert: outputs it cannot write ---------------------------------------------------------
def _convert_fails_in_one_line(capsys, out: Path, reason: str) -> None:
    assert cli_main(["convert", str(M0_PDPARAMS), str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert str(out) in err[0] and reason in err[0] and "nothing was written" in err[0], err[0]


def _left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def test_convert_into_a_file_or_with_a_name_too_long(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    _convert_fails_in_one_line(capsys, tmp_path / "afile" / "m0.safetensors", "afile is a file, not a folder")
    _convert_fails_in_one_line(capsys, tmp_path / "afile" / "sub" / "m0.safetensors", "is a file, not a folder")
    long = tmp_path / "new" / ("n" * 288 + ".safetensors")  # 300 characters
    _convert_fails_in_one_line(capsys, long, "too long")
    assert _left_in(tmp_path) == ["afile"]  # not the folder "new" that convert made either


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "full"), (errno.EACCES, "permission")]
)
def test_convert_on_a_read_only_or_full_file_system(tmp_path, capsys, monkeypatch, code, reason) -> None:
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    # a read-only or permission-less folder refuses the temporary file; a full disk the write itself
    if code == errno.ENOSPC:
        monkeypatch.setattr(os, "fsync", refuse)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _convert_fails_in_one_line(capsys, tmp_path / "m0.safetensors", reason)
    assert _left_in(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_convert_into_a_read_only_folder(tmp_path, capsys) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _convert_fails_in_one_line(capsys, folder / "m0.safetensors", "permission")
        assert _left_in(folder) == []
    finally:
        folder.chmod(0o755)


CONVERT = "import sys; from micronet_torch.cli.main import main; sys.exit(main(sys.argv[1:]))"


def _small_file_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@pytest.mark.subprocess
def test_convert_past_the_file_size_limit(tmp_path) -> None:
    out = tmp_path / "out" / "m0.safetensors"
    cmd = [sys.executable, "-c", CONVERT, "convert", str(M0_PDPARAMS), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), preexec_fn=_small_file_limit)
    err = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert str(out) in err[0] and "file-size limit" in err[0] and "nothing was written" in err[0]
    assert _left_in(tmp_path) == []
