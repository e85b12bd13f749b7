"""Building and loading the C kernels (dictionary_learning/native.py), and the fallback."""

import logging
import os
from pathlib import Path

import pytest
import torch

from dictionary_learning import native
from find_top_connections import collect_activations, top_connections
from tests.scae_fixtures import random_batch, random_suite


def _fresh(monkeypatch, tmp_path, **env):
    """An empty SCAE cache, the given environment, and no library loaded yet."""
    monkeypatch.setenv("SCAE_CACHE", str(tmp_path / "cache"))
    for name in ("CC", "SCAE_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    native._load.cache_clear()


@pytest.fixture(autouse=True)
def _forget_loaded():
    yield
    native._load.cache_clear()


def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    _fresh(monkeypatch, tmp_path)
    lib = native.load("coactive_top")
    assert lib is not None and hasattr(lib, "coactive_top")
    built = list((tmp_path / "cache" / "native").iterdir())
    assert [p.suffix for p in built] == [".so"]
    mtime = built[0].stat().st_mtime_ns
    native._load.cache_clear()  # a new process: loads the file, does not rebuild it
    assert native.load("coactive_top") is not None
    assert list((tmp_path / "cache" / "native").iterdir()) == built
    assert built[0].stat().st_mtime_ns == mtime


def test_a_library_others_can_write_is_not_loaded(monkeypatch, tmp_path, caplog):
    """Loading a library runs its code: one that others could have changed is refused."""
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    _fresh(monkeypatch, tmp_path)
    assert native.load("coactive_top") is not None
    (lib,) = (tmp_path / "cache" / "native").iterdir()
    lib.chmod(0o666)
    native._load.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.native"):
        assert native.load("coactive_top") is None
    assert "others can write to it" in caplog.text and "delete it" in caplog.text


def test_failed_build_leaves_no_file_and_the_search_takes_the_torch_route(
        monkeypatch, tmp_path, caplog):
    fake = tmp_path / "fake-cc"
    # writes part of its output, then fails, as a compiler that crashes would
    fake.write_text('#!/bin/sh\ncase "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                    'while [ "$1" != "-o" ]; do shift; done\necho partial > "$2"\n'
                    'echo "error: boom" >&2\nexit 1\n')
    fake.chmod(0o755)
    suite = random_suite(n_layers=2, d=8, F=16, k=2, dtype=torch.float32)
    acts = collect_activations(suite, [random_batch(2, 8, B=48, dtype=torch.float32)], 48)
    _fresh(monkeypatch, tmp_path, SCAE_NATIVE="0")
    assert native.load("coactive_top") is None
    want = top_connections(suite, acts, 5, method="coactive")

    _fresh(monkeypatch, tmp_path, CC=str(fake))
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.native"):
        got = top_connections(suite, acts, 5, method="coactive")
    assert "boom" in caplog.text and "slower torch route" in caplog.text
    assert not any((tmp_path / "cache" / "native").iterdir())  # no half-written library
    assert all(torch.equal(got[d][u], want[d][u]) for d in want for u in want[d])

    caplog.clear()
    _fresh(monkeypatch, tmp_path, CC=str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="dictionary_learning.native"):
        assert native.load("coactive_top") is None
    assert "does not run" in caplog.text and "set CC" in caplog.text


def test_kernels_share_torchs_openmp_threads_or_run_from_the_pool_with_the_same_results(
        monkeypatch, tmp_path):
    """Where torch runs on its own libgomp, the kernels are built against it (one OpenMP runtime
    in the process) and run their parts on its threads; the Python pool, one call per part,
    gives the same results (the top features, the random others, a sampled product)."""
    from dictionary_learning import candidates, sparse_ops

    if native.compiler() is None:
        pytest.skip("no C compiler here")
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # three parts on any machine
    libs = [native.load("candidates"), native.load("sparse_rows")]
    if native.torch_openmp() is not None:
        assert all(lib.openmp for lib in libs)
        runtimes = {os.path.realpath(line.split()[-1])
                    for line in Path("/proc/self/maps").read_text().splitlines()
                    if "libgomp" in line.split()[-1]}
        assert runtimes == {os.path.realpath(native.torch_openmp())}

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 300, generator=g)
    x, W = torch.randn(64, 24, generator=g), torch.randn(300, 24, generator=g)

    def results():
        cand = candidates.select_candidates(pre, 3, 5, 4, torch.Generator().manual_seed(1))
        return cand, sparse_ops.dot_at_candidates(x, W, cand)

    with_threads = results()
    calls = []
    real_run = native.run
    monkeypatch.setattr(native, "run", lambda lib, k, *a: calls.append(k) or real_run(lib, k, *a))
    for lib in libs:
        monkeypatch.setattr(lib, "openmp", False)
    parts = []
    real = native.parallel
    monkeypatch.setattr(native, "parallel", lambda fn, args: parts.append(len(args)) or
                        real(fn, args))
    pooled = results()
    assert calls == ["top_features", "random_others", "rows_dot"]
    assert set(parts) == {3}
    assert all(torch.equal(a, b) for a, b in zip(with_threads, pooled, strict=True))
