"""The native-library cache: trusted through file descriptors, its folders checked up to /, built once under a lock."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from pathlib import Path

import pytest

from micronet_torch.kernels import build, cache, ort_ops

SOURCE = '__attribute__((visibility("default"))) int micronet_test_answer(void) { return ANSWER; }\n'
NOBODY = 65534


@pytest.fixture
def sources(tmp_path) -> tuple[Path, Path]:
    """Two libraries' sources: one answers 42, the other 43."""
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    out = []
    for answer in (42, 43):
        src = tmp_path / f"src{answer}" / "answer.c"
        src.parent.mkdir()
        src.write_text(SOURCE.replace("ANSWER", str(answer)))
        out.append(src)
    return out[0], out[1]


def answer(path: str | Path) -> int:
    return ctypes.CDLL(str(path)).micronet_test_answer()


def test_a_library_swapped_after_its_check_is_not_what_is_loaded(sources, tmp_path) -> None:
    good, evil = sources
    lib = build.open_library(good, "answer", "test", directory=tmp_path / "cache")
    other = build.build_library(evil, "answer", "test", directory=tmp_path / "elsewhere")
    checked_inode = os.fstat(lib.fd).st_ino
    os.replace(other, lib.path)  # the rename an attacker would race against the loader
    assert lib.load_path() == f"/proc/self/fd/{lib.fd}"
    assert os.stat(lib.load_path()).st_ino == checked_inode != lib.path.stat().st_ino
    assert answer(lib.load_path()) == 42  # the checked file, whatever its name now points to
    assert answer(lib.path) == 43  # loading by name (the old way) would have run the swapped-in code
    lib.close()


def test_private_copy_holds_the_checked_bytes(sources, tmp_path) -> None:
    good, evil = sources
    lib = build.open_library(good, "answer", "test", directory=tmp_path / "cache")
    original = lib.path.read_bytes()
    os.replace(build.build_library(evil, "answer", "test", directory=tmp_path / "other"), lib.path)
    copy = lib.private_copy()
    assert copy.read_bytes() == original and copy.parent.stat().st_mode & 0o777 == 0o700
    assert answer(copy) == 42
    lib.close()
    assert not copy.parent.exists()  # removed with the library


def test_register_hands_onnx_runtime_the_checked_descriptor(monkeypatch, tmp_path) -> None:
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(ort_ops, "cache_dir", lambda: tmp_path / "ort_ops")

    class Options:
        def register_custom_ops_library(self, path: str) -> None:
            self.path = path

    first, second = Options(), Options()
    assert ort_ops.register(first) == ort_ops.library_path() == ort_ops.library().path
    cached = ort_ops.library().path
    inode = cached.stat().st_ino
    assert first.path.startswith("/proc/self/fd/") and os.stat(first.path).st_ino == inode
    cached.unlink()  # the cache's name now points nowhere (or to another file): the session still gets ours
    ort_ops.register(second)
    assert second.path == first.path and os.stat(second.path).st_ino == inode


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_cache_below_a_folder_others_can_write_is_refused(sources, tmp_path, mode) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(mode)
    if mode == 0o770:  # group-writable: refused only when the group has another member
        if not cache.folder_problem(parent.stat()):
            pytest.skip("this folder's group has no other member here")
    with pytest.raises(build.CacheError, match=f"{parent} is writable by") as err:
        build.build_library(sources[0], "answer", "test", directory=parent / "home" / "cache")
    assert "\n" not in str(err.value) and not list(parent.iterdir())  # nothing created below it


def test_sticky_bit_protects_a_shared_parent(sources, tmp_path) -> None:
    parent = tmp_path / "tmp-like"
    parent.mkdir()
    parent.chmod(0o1777)
    folder = parent / "home" / "cache"
    lib = build.build_library(sources[0], "answer", "test", directory=folder)
    assert answer(lib) == 42
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in (folder, folder.parent))  # created 0700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
def test_a_parent_owned_by_another_user_is_refused(sources, tmp_path) -> None:
    parent = tmp_path / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(build.CacheError, match=f"{parent} belongs to user id {NOBODY}"):
        build.build_library(sources[0], "answer", "test", directory=parent / "cache")


def _build_one(source: Path, folder: Path, compiler: Path) -> None:
    build.build_library(source, "answer", "test", directory=folder, compiler=str(compiler))


@pytest.mark.subprocess
def test_concurrent_first_uses_compile_once(sources, tmp_path) -> None:
    """Two processes that need the same library at once: one compiles, the other waits for the lock and
    finds it built (how pytest-xdist workers share one cache)."""
    log = tmp_path / "compiles.log"
    cc = tmp_path / "slow-cc"
    cc.write_text(f'#!/bin/sh\necho "$*" >> {log}\nsleep 1\nexec {build.find_compiler()} "$@"\n')
    cc.chmod(0o755)
    fork = multiprocessing.get_context("fork")  # no re-import of torch in the children
    procs = [fork.Process(target=_build_one, args=(sources[0], tmp_path / "cache", cc)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    outputs = {line.split(" -o ")[1].split()[0] for line in log.read_text().splitlines()}
    assert len(outputs) == 1  # one build (one -o), whether or not -march=native had to be dropped
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(names) == 2 and names[1] == names[0] + ".sha256"  # no temporary file left


@pytest.mark.runtime
def test_openvino_loads_a_private_copy(tmp_path) -> None:
    pytest.importorskip("openvino")
    from micronet_torch.kernels import openvino_ops

    try:
        cached = openvino_ops.library_path()
    except build.FusedOpsUnavailable as err:
        pytest.skip(str(err))
    loaded = Path(openvino_ops.extension_path())
    assert loaded != cached and loaded.read_bytes() == cached.read_bytes()
    assert loaded.parent.stat().st_mode & 0o777 == 0o700
