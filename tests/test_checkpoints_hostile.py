"""Crafted checkpoints of every format: the .pdparams unpickler and every reader through the command line.

Every attack file is crafted here. The crafted checkpoints are read in a subprocess, so that a crash
(the segfault numpy's own reconstruction gives) fails the test instead of killing pytest."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED_FIXTURES, deadline
from PIL import Image

from micronet_torch.checkpoints.errors import CheckpointError
from micronet_torch.checkpoints.files import MAX_BYTES_ENV
from micronet_torch.checkpoints.state_dict import paddleclas_filter_fn, pdparams_from_bytes, read_pdparams

FIXTURES = SHARED_FIXTURES
M0_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams"
M2_PDPARAMS = FIXTURES / "paddleclas" / "MicroNet_M2_random.pdparams"
M0_OFFICIAL = FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
SRC = Path(__file__).resolve().parents[1] / "src"

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct


def png(path: Path, size: int = 4) -> None:
    Image.new("L", (size, size)).save(path)


# ---- crafting .pdparams -----------------------------------------------------------------------------
PLAIN_F4_STATE = (3, "<", None, None, None, -1, -1, 0)


class FakeDType:
    """Pickles as ``numpy.dtype(*args)`` with BUILD ``state``: any state numpy would trust, never run here."""

    def __init__(self, args=("f4", False, True), state=PLAIN_F4_STATE):
        self.args, self.state = args, state

    def __reduce__(self):
        return (np.dtype, self.args, self.state)


class FakeArray:
    """Pickles as numpy's ``_reconstruct(ndarray, (0,), b'b')`` with BUILD ``state``."""

    def __init__(self, state, recon_args=None):
        self.state, self.recon_args = state, recon_args or (np.ndarray, (0,), b"b")

    def __reduce__(self):
        return (_reconstruct, self.recon_args, self.state)


class Call:
    """Pickles as ``func(*args)``: what a pickle that runs code looks like."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def arr(shape, data, dtype=None, fortran=False, version=1):
    return FakeArray((version, shape, dtype or FakeDType(), fortran, data))


def pdparams(entries) -> bytes:
    return pickle.dumps(entries, protocol=4)


def crafted_files(marker: Path) -> dict[str, bytes]:
    """Every kind of hostile .pdparams this reader must refuse."""
    f4 = np.arange(4, dtype="<f4").tobytes()
    obj_field = {"a": (np.dtype("O"), 0)}
    cmd = f"touch {marker}"
    files = {
        # dtype tricks: object fields (numpy dereferences file bytes as pointers), offsets past the item
        "object_field": {
            "w": arr((1,), b"A" * 8, FakeDType(("V8", False, True), (3, "|", None, ("a",), obj_field, 8, 1, 0)))
        },
        "object_field_f4": {
            "w": arr((1,), b"A" * 4, FakeDType(("f4", False, True), (3, "<", None, ("a",), obj_field, 4, 1, 0)))
        },
        "field_offset_f4": {
            "w": arr((1,), b"B" * 4, FakeDType(state=(3, "<", None, ("a",), {"a": (FakeDType(), 4096)}, 4, 1, 0)))
        },
        "field_offset": {
            "w": arr(
                (1,),
                b"B" * 4,
                FakeDType(("V4", False, True), (3, "|", None, ("a",), {"a": (np.dtype("f4"), 4096)}, 4, 1, 0)),
            )
        },
        "object_dtype": {
            "w": arr((1,), b"A" * 8, FakeDType(("O8", False, True), (3, "|", None, None, None, -1, -1, 63)))
        },
        "object_flags": {"w": arr((1,), f4[:4], FakeDType(state=(3, "<", None, None, None, -1, -1, 63)))},
        "string_dtype": {"w": arr((1,), b"abcd", FakeDType(("U1", False, True)))},
        "subarray": {
            "w": arr(
                (1,), f4 * 4, FakeDType(("V16", False, True), (3, "|", (np.dtype("f4"), (4,)), None, None, 16, 4, 0))
            )
        },
        "subarray_f4": {"w": arr((1,), f4, FakeDType(state=(3, "<", (FakeDType(), (4,)), None, None, -1, -1, 0)))},
        "elsize_lie": {"w": arr((1,), f4, FakeDType(state=(3, "<", None, None, None, 4096, -1, 0)))},
        "metadata": {"w": arr((1,), f4[:4], FakeDType(state=(4, "<", None, None, None, -1, -1, 0, {"x": 1})))},
        "bad_order": {"w": arr((1,), f4[:4], FakeDType(state=(3, "|", None, None, None, -1, -1, 0)))},
        "dtype_args": {"w": arr((1,), f4[:4], FakeDType(("f4", "x", Call(os.getcwd))))},
        # byte lengths that do not match the shape: stride-0 style broadcasts, short data, huge shapes
        "stride0_1e8": {"w": arr((100_000_000,), f4[:4])},
        "short_data": {"w": arr((10,), f4[:4])},
        "long_data": {"w": arr((1,), f4)},
        "huge_shape": {"w": arr((2**62,), f4[:4])},
        "huge_product": {"w": arr((2**31, 2**31, 2**31), b"")},
        "negative_dim": {"w": arr((-1,), b"")},
        "bool_dim": {"w": arr((True,), f4[:4])},
        "float_dim": {"w": arr((1.0,), f4[:4])},
        "too_many_dims": {"w": arr((1,) * 40, f4[:4])},
        "zero_dim_with_data": {"w": arr((0,), f4[:4])},
        # wrong types
        "data_list": {"w": arr((1,), [1.0])},
        "data_str": {"w": arr((1,), "abcd")},
        "shape_list": {"w": arr([1], f4[:4])},
        "fortran_int": {"w": arr((1,), f4[:4], fortran=1)},
        "array_version": {"w": arr((1,), f4[:4], version=2)},
        "array_state_short": {"w": FakeArray((1, (1,)))},
        "array_state_dict": {"w": FakeArray({"shape": (1,)})},
        "dtype_is_str": {"w": FakeArray((1, (1,), "f4", False, f4[:4]))},
        "recon_args": {"w": FakeArray((1, (1,), FakeDType(), False, f4[:4]), (Call(os.getcwd), (0,), b"b"))},
        "unbuilt_array": {"w": FakeArray(None)},
        "top_list": [arr((1,), f4[:4])],
        "key_int": {1: arr((1,), f4[:4])},
        "value_int": {"w": 3},
        "value_dict": {"w": {"x": arr((1,), f4[:4])}},
        # pickles that run code
        "os_system": {"w": Call(os.system, cmd)},
        "eval": {"w": Call(eval, f"__import__('os').system({cmd!r})")},
        "exec": Call(exec, f"import os; os.system({cmd!r})"),
        "subprocess": {"w": Call(subprocess.Popen, ["touch", str(marker)])},
        "getattr": Call(getattr, Call(__import__, "os"), "system"),
        "numpy_frombuffer": {"w": Call(np.frombuffer, b"\0" * 8, "O")},
        "numpy_core_func": Call(np.dtype, "O"),  # numpy.dtype is allowed, but only our stand-in with plain codes
    }
    one = arr((1,), f4[:4])
    files["many_entries"] = {f"k{i}": one for i in range(20_001)}  # one memoized array, 20001 names
    big = bytes(12_000_000)  # pickled once, referenced by every entry: 12 MB of file, 96 MB of tensors
    files["memo_amplified"] = {f"k{i}": arr((3_000_000,), big) for i in range(8)}
    out = {name: pdparams(obj) for name, obj in files.items()}
    out["posix_system"] = b"\x80\x02cposix\nsystem\nq\x00X" + struct.pack("<I", len(cmd)) + cmd.encode() + b"\x85R."
    out["inst_opcode"] = b"(S'" + cmd.encode() + b"'\nios\nsystem\n."
    out["obj_opcode"] = b"\x80\x02(cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd.encode() + b"o."
    out["persistent_id"] = b"\x80\x02X\x01\x00\x00\x00xQ."
    out["ext_opcode"] = b"\x80\x02\x82\x01)R."
    out["binbytes8_huge"] = b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc."
    out["memo_index_huge"] = b"\x80\x02}r" + struct.pack("<I", 2**30) + b"."
    out["frame_huge"] = b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"}."
    out["unknown_opcode"] = b"\x80\x04\xff."
    out["deep_nesting"] = b"\x80\x04" + b"]" * 200_000 + b"a" * 199_999 + b"."
    out["marks"] = b"\x80\x04" + b"(" * 100_000 + b"."
    out["empty"] = b""
    out["garbage"] = bytes(range(256)) * 4
    if M0_PDPARAMS.is_file():
        real = M0_PDPARAMS.read_bytes()
        out["truncated_real"] = real[: len(real) // 3]
        out["truncated_header"] = real[:200]
    return out


READER = """
import json, sys
from micronet_torch.checkpoints.state_dict import read_pdparams
from micronet_torch.checkpoints.errors import CheckpointError
results = {}
for path in sys.argv[1:]:
    try:
        read_pdparams(path)
        results[path] = ["loaded", ""]
    except CheckpointError as err:
        results[path] = ["CheckpointError", str(err)]
    except BaseException as err:
        results[path] = [type(err).__name__, str(err)[:300]]
print(json.dumps(results))
"""


def test_crafted_pdparams_are_refused_without_crash(tmp_path) -> None:
    """Each crafted file raises CheckpointError with one line naming it; no crash, no code run, nothing loaded."""
    marker = tmp_path / "code-ran"
    paths = []
    for name, data in crafted_files(marker).items():
        path = tmp_path / f"{name}.pdparams"
        path.write_bytes(data)
        paths.append(str(path))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-c", READER, *paths], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, f"the reader process died ({proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout)
    wrong = {Path(p).stem: r for p, r in results.items() if r[0] != "CheckpointError"}
    assert not wrong, wrong
    for path, (_, message) in results.items():
        assert "\n" not in message and path in message, message
    assert not marker.exists(), "a crafted pickle ran code"


def test_numpy_free_reader_matches_the_numpy_reader() -> None:
    """The two real PaddleClas fixtures give exactly the tensors of the numpy-based reader (and the official file)."""

    def numpy_reader(path: Path) -> dict[str, torch.Tensor]:
        """numpy's own unpickling, for the two trusted fixtures only, renamed by the package's key map (which the
        comparison with the official PyTorch file below checks on its own)."""
        with open(path, "rb") as fh:
            raw = pickle.load(fh)  # the shared fixtures are ours: numpy may rebuild them
        tensors = {
            key: torch.from_numpy(np.array(value, dtype=np.float32))
            for key, value in raw.items()
            if key != "StructuredToParameterName@@"
        }
        return paddleclas_filter_fn(tensors)

    for path in (M0_PDPARAMS, M2_PDPARAMS):
        if not path.is_file():
            pytest.skip("fixtures not available")
        ours, theirs = read_pdparams(path), numpy_reader(path)
        assert list(ours) == list(theirs)
        for key, value in ours.items():
            assert value.dtype == torch.float32 and value.is_contiguous()
            assert torch.equal(value, theirs[key]), key
    official = torch.load(M0_OFFICIAL, map_location="cpu", weights_only=True)["state_dict"]
    official = {k.removeprefix("module."): v for k, v in official.items() if not k.endswith("num_batches_tracked")}
    ours = read_pdparams(M0_PDPARAMS)
    assert ours.keys() == official.keys()
    assert all(torch.equal(ours[k], official[k]) for k in ours)


def test_plain_dtypes_byte_orders_and_fortran_order() -> None:
    """Every allowed dtype, both byte orders and Fortran-ordered data give the values numpy would give."""
    rng = np.random.default_rng(0)
    cases = {}
    for code in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "b1"):
        for order in ("<", ">") if code[1] != "1" else ("|",):
            base = rng.standard_normal((3, 5)) * 50 if code[0] == "f" else rng.integers(0, 100, (3, 5))
            values = base.astype(np.dtype(order + code) if order != "|" else code)
            state = (3, order, None, None, None, -1, -1, 0)
            key = f"blocks.{code}{'be' if order == '>' else ''}.x"
            cases[key] = (values, arr(values.shape, values.tobytes(), FakeDType((code, False, True), state)))
    f = np.asfortranarray(rng.standard_normal((4, 6)).astype("<f4"))
    cases["fortran.x"] = (f, arr(f.shape, f.tobytes(order="A"), fortran=True))
    cases["scalar.x"] = (np.array(2.5, "<f4"), arr((), np.array(2.5, "<f4").tobytes()))
    cases["empty.x"] = (np.zeros((0, 3), "<f4"), arr((0, 3), b""))
    data = pdparams({**{k: v for k, (_, v) in cases.items()}, "StructuredToParameterName@@": {"a": "b"}})
    out = pdparams_from_bytes(data)
    assert set(out) == set(cases)
    for key, (values, _) in cases.items():
        want = torch.from_numpy(np.array(values, dtype=np.float32, order="C"))
        assert out[key].dtype == torch.float32 and torch.equal(out[key], want), key


def test_paddle_names_become_published_names() -> None:
    w = np.arange(6, dtype="<f4").reshape(2, 3)
    data = pdparams(
        {
            "bn._mean": arr((2,), w[0, :2].tobytes()),
            "bn._variance": arr((2,), w[0, :2].tobytes()),
            "fc.weight": arr((2, 3), w.tobytes()),
            "StructuredToParameterName@@": {"x": "y"},
        }
    )
    out = pdparams_from_bytes(data)
    assert set(out) == {"bn.running_mean", "bn.running_var", "fc.weight"}
    assert torch.equal(out["fc.weight"], torch.from_numpy(w.T.copy()))


def test_size_limit_argument_and_environment(tmp_path, monkeypatch) -> None:
    data = pdparams({"w": arr((1000,), np.zeros(1000, "<f4").tobytes())})
    path = tmp_path / "w.pdparams"
    path.write_bytes(data)
    assert read_pdparams(path)["w"].shape == (1000,)
    with pytest.raises(CheckpointError, match=r"size limit|more than"):
        read_pdparams(path, max_bytes=2000)
    monkeypatch.setenv(MAX_BYTES_ENV, "3000")
    with pytest.raises(CheckpointError, match=MAX_BYTES_ENV):
        read_pdparams(path)
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(CheckpointError, match="whole number"):
        read_pdparams(path)


def test_checkpoint_that_is_a_fifo_or_missing(tmp_path) -> None:
    fifo = tmp_path / "w.pdparams"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(CheckpointError, match="not a regular file"):
        read_pdparams(fifo)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_pdparams(tmp_path / "missing.pdparams")


def test_checkpoint_error_is_a_value_error() -> None:
    """Callers that catch ValueError (and the CLI's exit-2 handler for weights.CheckpointError) still work."""
    assert issubclass(CheckpointError, ValueError)


# ---- every reader, through the command line: eval and convert ---------------------------------------
def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def crafted_checkpoints(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    """Hostile files of every format (name -> bytes; the suffix is the name's)."""
    from safetensors.torch import save

    from micronet_torch import create_model

    pd = crafted_files(marker)
    out = {
        f"{k}.pdparams": pd[k]
        for k in ("object_field", "field_offset", "stride0_1e8", "huge_shape", "os_system", "posix_system")
    }
    stem = "features.0.stem.0.conv.0.weight"
    f4 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    out["header_too_long.safetensors"] = struct.pack("<Q", 2**40) + b"{}"
    out["header_lies_size.safetensors"] = _safetensors_bytes({"w": {**f4, "shape": [1000]}}, bytes(8))
    out["offsets_past_end.safetensors"] = _safetensors_bytes({"w": {**f4, "data_offsets": [0, 8000]}}, bytes(8))
    out["overlap.safetensors"] = _safetensors_bytes({"w": f4, "v": f4}, bytes(8))
    out["object_dtype.safetensors"] = _safetensors_bytes({"w": {**f4, "dtype": "O"}}, bytes(8))
    out["huge_shape.safetensors"] = _safetensors_bytes({"w": {**f4, "shape": [2**62, 2**62]}}, bytes(8))
    out["not_json.safetensors"] = struct.pack("<Q", 4) + b"{{{{"
    rank1 = {stem: torch.zeros(6)}
    out["rank1_stem.safetensors"] = save(rank1)
    buf = io.BytesIO()
    torch.save(rank1, buf)
    out["rank1_stem.pth"] = buf.getvalue()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name, obj in {
        "runs_code.pth": {"state_dict": {"a": torch.zeros(1)}, "x": RunsCode()},
        "stride0_huge.pth": {stem: torch.zeros(1).expand(10**9)},
        "scalar_head.pth": {"classifier.2.linear.0.weight": torch.tensor(1.0)},
        "complex.pth": {stem: torch.zeros(2, 3, 3, 1, dtype=torch.complex64)},
    }.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        out[name] = buf.getvalue()
    sd = create_model("micronet_m0", num_classes=3).state_dict()
    training = {"model": sd, "model_name": "micronet_m0", "num_classes": 3, "in_chans": 3, "img_size": 32}
    training["class_names"] = ["a", "b", "c"]
    for name, extra in {
        "kwargs_checkpoint_path.pt": {"model_kwargs": {"checkpoint_path": str(marker)}},
        "kwargs_object.pt": {"model_kwargs": {"width": [1.0]}},
        "model_hf_hub.pt": {"model_name": "hf-hub:someone/model"},
        "config_hf_hub.pt": {"config": {"model": "hf-hub:someone/model", "model_kwargs": {}}},
        "data_config_huge.pt": {"data_config": {"img_size": 10**9}},
        "optimizer_stride0.pt": {"optimizer": {"state": {0: {"momentum_buffer": torch.zeros(1).expand(10**9)}}}},
    }.items():
        buf = io.BytesIO()
        torch.save({**training, **extra}, buf)
        out[name] = buf.getvalue()
    out["notes.txt"] = b"remember to buy milk\n"
    out["photo.png"] = b"\x89PNG\r\n\x1a\n" + bytes(40)
    out["model.onnx"] = b"\x08\x08\x12\x07pytorch" + bytes(20)
    out["empty.pt"] = b""
    return out


CLI_RUNNER = """
import contextlib, io, json, sys
from micronet_torch.cli.main import main
data, out_dir, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
results = {}
for path in paths:
    for argv in (["eval", "-c", path, "--data", data], ["convert", path, out_dir + "/out.safetensors"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except BaseException as exc:
                rc = f"{type(exc).__name__}: {exc}"[:300]
        results[argv[0] + " " + path] = [rc, err.getvalue()]
print(json.dumps(results))
"""


def test_crafted_checkpoints_exit_2_with_one_line_from_eval_and_convert(tmp_path) -> None:
    """Every crafted file, of every format: exit 2 and one line naming it, from eval and convert; no code runs."""
    marker = tmp_path / "code-ran"
    files = tmp_path / "files"
    files.mkdir()
    paths = []
    for name, data in crafted_checkpoints(tmp_path, marker).items():
        (files / name).write_bytes(data)
        paths.append(str(files / name))
    data_dir = tmp_path / "data" / "a"
    data_dir.mkdir(parents=True)
    png(data_dir / "0.png", 8)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-c", CLI_RUNNER, str(tmp_path / "data"), str(tmp_path), *paths]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-2000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {k: v for k, v in results.items() if v[0] != 2 or len(v[1].strip().splitlines()) != 1}
    assert not wrong, wrong
    for key, (_, err) in results.items():
        path = key.split(" ", 1)[1]
        assert path in err and "Traceback" not in err, (key, err)
    assert not marker.exists(), "a crafted file ran code"
    assert not (tmp_path / "out.safetensors").exists(), "convert wrote something from a crafted file"
