"""The PaddleClas reader, fed a real .pdparams mutated byte by byte: it returns float32 tensors made from the
file's own bytes, or raises CheckpointError; never a crash, another exception, or memory it did not read.

Seeded and bounded (a few hundred mutations, mostly on the pickle's opcodes, where the structure is).
"""

from __future__ import annotations

import io
import pickletools
import random
import struct

import numpy as np
import pytest
import torch
from helpers import SHARED_FIXTURES

from micronet_torch.checkpoints.errors import CheckpointError
from micronet_torch.checkpoints.pdparams import RawArray, parse_pdparams
from micronet_torch.checkpoints.state_dict import pdparams_from_bytes

M0_PDPARAMS = SHARED_FIXTURES / "paddleclas" / "MicroNet_M0_random.pdparams"
SEED = 1515
MUTATIONS_SMALL = 360  # on the first entries of the real file (fast to parse)
MUTATIONS_FULL = 40  # on the whole real file


@pytest.fixture(scope="module")
def real() -> bytes:
    if not M0_PDPARAMS.is_file():
        pytest.skip("fixtures not available")
    return M0_PDPARAMS.read_bytes()


def prefix_pickle(data: bytes, max_size: int = 300_000) -> bytes:
    """The real file cut after the last whole entry below ``max_size`` bytes, closed with SETITEMS, STOP.

    The bytes are the file's own; only the length of the frame the cut falls in is rewritten.
    """
    ops = list(pickletools.genops(io.BytesIO(data)))
    cut, frame, last_frame = None, None, None
    for i, (op, _, pos) in enumerate(ops[:-1]):
        if op.name == "FRAME":
            last_frame = pos
        end = ops[i + 1][2]
        if op.name == "BUILD" and ops[i + 1][0].name in ("SHORT_BINUNICODE", "BINUNICODE") and end < max_size:
            cut, frame = end, last_frame
    assert cut is not None
    out = bytearray(data[:cut] + b"u.")
    if frame is not None:
        body = frame + 9
        declared = struct.unpack("<Q", data[frame + 1 : body])[0]
        if body + declared > cut:  # the cut falls inside this frame
            out[frame + 1 : body] = struct.pack("<Q", len(out) - body)
    return bytes(out)


def structure_positions(data: bytes) -> list[int]:
    """Byte offsets of opcodes and the first bytes of their arguments (not the array data)."""
    positions = []
    for _, _, pos in pickletools.genops(io.BytesIO(data)):
        positions.extend(range(pos, min(pos + 10, len(data))))
    return positions


def mutate(data: bytes, positions: list[int], rng: random.Random) -> bytes:
    kind = rng.random()
    at = min(rng.choice(positions) if kind < 0.8 else rng.randrange(len(data)), len(data) - 1)
    if kind < 0.55 or kind >= 0.8:
        value = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256), data[at] ^ (1 << rng.randrange(8))))
        return data[:at] + bytes([value]) + data[at + 1 :]
    if kind < 0.65:
        return data[:at] + data[at + 1 :]
    if kind < 0.75:
        return data[:at] + bytes([rng.randrange(256)]) + data[at:]
    return data[:at]


def expected_tensor(arr: RawArray) -> np.ndarray:
    """What the array's own bytes say, decoded independently with numpy (a plain dtype only)."""
    if arr.code == "b1":
        flat = (np.frombuffer(arr.data, np.uint8) != 0).astype(np.float32)
    else:
        order = "|" if arr.code[1] == "1" else arr.order
        flat = np.frombuffer(arr.data, np.dtype(order + arr.code)).astype(np.float32)
    return np.array(flat.reshape(arr.shape, order="F" if arr.fortran else "C"), dtype=np.float32, order="C")


def check(data: bytes) -> str:
    """Read mutated bytes and check the invariant; the outcome's kind."""
    try:
        out = pdparams_from_bytes(data, "fuzz.pdparams")
    except CheckpointError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("fuzz.pdparams: "), message
        return "refused"
    raw = parse_pdparams(data)
    want: dict[str, np.ndarray] = {}
    for key, arr in raw.items():
        if arr is None:
            continue
        assert arr.data in data, f"{key}: bytes that are not in the file"
        value = expected_tensor(arr)
        if key.endswith("._mean"):
            key = key[: -len("_mean")] + "running_mean"
        elif key.endswith("._variance"):
            key = key[: -len("_variance")] + "running_var"
        elif key.endswith(".weight") and value.ndim == 2:
            value = np.ascontiguousarray(value.T)
        want[key] = value
    assert type(out) is dict and list(out) == list(want)
    for key, tensor in out.items():
        assert type(tensor) is torch.Tensor and tensor.dtype == torch.float32 and tensor.is_contiguous(), key
        torch.testing.assert_close(tensor, torch.from_numpy(want[key]), rtol=0, atol=0, equal_nan=True)
    return "loaded"


def test_prefix_seed_is_the_real_file_read_the_same(real) -> None:
    seed = prefix_pickle(real)
    part, full = pdparams_from_bytes(seed), pdparams_from_bytes(real)
    assert 10 < len(part) < len(full)
    assert all(torch.equal(part[k], full[k]) for k in part)


def test_fuzz_real_pdparams(real) -> None:
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for data, count in ((prefix_pickle(real), MUTATIONS_SMALL), (real, MUTATIONS_FULL)):
        positions = structure_positions(data)
        for _ in range(count):
            outcomes[check(mutate(data, positions, rng))] += 1
    # both outcomes happen: mutations of the array data load (different numbers), most structural ones fail
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 100, outcomes


# ---- the one loader (checkpoints/loader.py): .pth and .safetensors mutated the same way ------------------------
M0_OFFICIAL = SHARED_FIXTURES / "official" / "micronet-m0-official-random.pth.tar"
MUTATIONS_OTHER = 60


def _mutated_files(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    """Mutations biased to the structure: a zip's directory at the end, a safetensors header at the start."""
    out = []
    for _ in range(count):
        start, stop = rng.choice(((0, min(len(data), 4000)), (max(0, len(data) - 4000), len(data)), (0, len(data))))
        at = rng.randrange(start, stop)
        out.append(data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :] if rng.random() < 0.9 else data[:at])
    return out


@pytest.mark.parametrize("fmt", [".pth", ".safetensors"])
def test_fuzz_loader_other_formats(fmt, tmp_path) -> None:
    """The checkpoint loader returns a dict of tensors or raises CheckpointError for any mutated file."""
    from micronet_torch.checkpoints import loader

    if not M0_OFFICIAL.is_file():
        pytest.skip("fixtures not available")
    from safetensors.torch import save

    state = torch.load(M0_OFFICIAL, map_location="cpu", weights_only=True)["state_dict"]
    if fmt == ".pth":
        data = M0_OFFICIAL.read_bytes()
    else:
        data = save({k.removeprefix("module."): v.contiguous() for k, v in list(state.items())[:40]})
    rng = random.Random(SEED)
    path = tmp_path / f"fuzz{fmt}"
    outcomes = {"loaded": 0, "refused": 0}
    for mutated in _mutated_files(data, rng, MUTATIONS_OTHER):
        path.write_bytes(mutated)
        try:
            out = loader.read_state_dict(path)
        except CheckpointError as err:  # any other exception fails the test
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            outcomes["refused"] += 1
            continue
        assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 5, outcomes
