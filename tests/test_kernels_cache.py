"""The native-library cache: trusted through file descriptors, its folders checked up to /, built once under a lock."""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import pytest

from micronet_torch import _native
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


# ---- the operator cache -------------------------------------------------------------------------------
C_SOURCE = """
__attribute__((visibility("default"))) int micronet_test_answer(void) { return 42; }
"""


@pytest.fixture
def c_source(tmp_path) -> Path:
    if _native.find_compiler() is None:
        pytest.skip("no C compiler")
    src = tmp_path / "answer.c"
    src.write_text(C_SOURCE)
    return src


def build_answer(src: Path, folder: Path) -> Path:
    return _native.build_library(src, "answer", "test", directory=folder)


def loads_and_answers(path: Path) -> bool:
    import ctypes

    return ctypes.CDLL(str(path)).micronet_test_answer() == 42


def test_cache_key_covers_local_includes(c_source, tmp_path) -> None:
    """A library is rebuilt when a header it includes from its own folder changes, not only its source."""
    header = c_source.parent / "answer_value.h"
    header.write_text("#define ANSWER 42\n")
    c_source.write_text('#include "answer_value.h"\n' + C_SOURCE.replace("return 42", "return ANSWER"))
    assert _native.local_includes(c_source) == [header]
    folder = tmp_path / "cache"
    first = build_answer(c_source, folder)
    assert loads_and_answers(first) and build_answer(c_source, folder) == first
    header.write_text("#define ANSWER 43\n")
    second = build_answer(c_source, folder)
    assert second != first


def test_cache_build_records_sha256_and_reuses(c_source, tmp_path) -> None:
    folder = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", _native.NativeCacheWarning)
        lib = build_answer(c_source, folder)
        record = lib.with_name(lib.name + ".sha256")
        assert record.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
        assert (folder.stat().st_mode & 0o777) == 0o700
        mtime = lib.stat().st_mtime_ns
        assert build_answer(c_source, folder) == lib and lib.stat().st_mtime_ns == mtime  # trusted: not rebuilt
    assert loads_and_answers(lib)


def _rebuilt(c_source, folder, lib, match) -> None:
    with pytest.warns(_native.NativeCacheWarning, match=match):
        assert build_answer(c_source, folder) == lib
    assert not lib.is_symlink() and lib.stat().st_uid == os.geteuid()
    assert lib.with_name(lib.name + ".sha256").read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()


def test_cache_planted_symlink_is_removed_never_followed(c_source, tmp_path) -> None:
    folder = tmp_path / "cache"
    lib = build_answer(c_source, folder)
    evil = tmp_path / "evil.so"
    evil.write_bytes(lib.read_bytes())  # even a library whose hash would match is refused through a link
    lib.unlink()
    lib.symlink_to(evil)
    _rebuilt(c_source, folder, lib, "symlink")
    assert evil.read_bytes()  # the link's target is untouched


def test_cache_zero_byte_or_short_file_is_rebuilt(c_source, tmp_path) -> None:
    folder = tmp_path / "cache"
    lib = build_answer(c_source, folder)
    lib.write_bytes(b"")
    _rebuilt(c_source, folder, lib, "0 bytes")
    lib.write_bytes(b"\x7fELF")
    _rebuilt(c_source, folder, lib, "4 bytes")


def test_cache_replaced_library_or_missing_record_is_rebuilt(c_source, tmp_path) -> None:
    folder = tmp_path / "cache"
    lib = build_answer(c_source, folder)
    lib.write_bytes(lib.read_bytes() + b"\0planted")
    _rebuilt(c_source, folder, lib, "does not match")
    lib.with_name(lib.name + ".sha256").unlink()
    _rebuilt(c_source, folder, lib, "no SHA-256 record")
    record = lib.with_name(lib.name + ".sha256")
    planted = tmp_path / "planted.sha256"
    planted.write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    record.unlink()
    record.symlink_to(planted)
    _rebuilt(c_source, folder, lib, "record that is a symlink")
    lib.chmod(0o666)
    _rebuilt(c_source, folder, lib, "writable by other users")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file owned by another user")
def test_cache_file_of_another_user_is_never_loaded(c_source, tmp_path) -> None:
    folder = tmp_path / "cache"
    lib = build_answer(c_source, folder)
    os.chown(lib, NOBODY, NOBODY)
    _rebuilt(c_source, folder, lib, "belongs to user id 65534")
    os.chown(folder, NOBODY, NOBODY)
    with pytest.raises(_native.NativeCacheError, match="belongs to user id 65534"):
        build_answer(c_source, folder)


def test_cache_folder_symlink_or_open_folder_refused(c_source, tmp_path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "cache-link"
    link.symlink_to(real)
    with pytest.raises(_native.NativeCacheError, match="symlink"):
        build_answer(c_source, link)
    assert not list(real.iterdir())
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(_native.NativeCacheError, match="open is writable by other users") as err:
        build_answer(c_source, folder)
    assert "\n" not in str(err.value) and not list(folder.iterdir())


def test_native_record_stays_private_under_a_group_umask(c_source, tmp_path) -> None:
    """A group-writable umask must not make the SHA-256 record untrusted (a rebuild on every use)."""
    old = os.umask(0o002)
    try:
        lib = build_answer(c_source, tmp_path / "cache")
        with warnings.catch_warnings():
            warnings.simplefilter("error", _native.NativeCacheWarning)
            assert build_answer(c_source, tmp_path / "cache") == lib
    finally:
        os.umask(old)
    assert lib.with_name(lib.name + ".sha256").stat().st_mode & 0o077 == 0


def test_untrusted_operator_cache_surfaces_as_fused_ops_unavailable(tmp_path) -> None:
    """deploy.fused: a cache folder that is a symlink loads nothing and says why, in one line."""
    from micronet_torch.deploy.fused.build import FusedOpsUnavailable, library_path

    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "ort_ops"
    link.symlink_to(real)
    with pytest.raises(FusedOpsUnavailable, match="symlink") as err:
        library_path(directory=link)
    assert "\n" not in str(err.value) and not list(real.iterdir())
    if shutil.which("false"):
        with pytest.raises(FusedOpsUnavailable, match="failed") as err:  # a compiler that fails
            library_path(directory=tmp_path / "cache", compiler=shutil.which("false"))
        assert "\n" not in str(err.value)
