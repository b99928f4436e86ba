"""The autotune layer over the attention kernel's fixed tiles, run through the interpreter.

On a GPU the launcher times every candidate config once per tuning key and keeps the fastest.
Here the timer is scripted (the interpreter's timings mean nothing) but every candidate still
runs, so the tests check the selection and caching logic, that tuning launches leave no trace
in the results (the bias gradient is accumulated with atomics), and that every candidate
computes the same attention as the float64 reference. The on-disk cache (one file per test,
``tmp_path``) is exercised with scripted timers too.
"""

from __future__ import annotations

import json

import pytest
import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

import kernels.flash_attention as fa
from kernels.flash_attention import PREFIX, BlockConfig, autotune
from tests.kernels.test_flash_attention import (  # noqa: F401 - the autouse NaN-buffer fixture
    _poisoned_outputs,
    check_against_float64,
    make_case,
)


class ScriptedTimer:
    """Runs each timed launch once and answers the next scripted time (ms) for it."""

    def __init__(self, times: list[float]):
        self.times = list(times)
        self.calls = 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return self.times[(self.calls - 1) % len(self.times)]


@pytest.fixture(autouse=True)
def _cache_file(tmp_path, monkeypatch):
    """Every tuner of these tests keeps its on-disk cache in the test's own folder."""
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    return path


@pytest.fixture
def tuner(monkeypatch):
    """A fresh autotuner that the launcher uses as if on a GPU, with no forced config."""
    monkeypatch.delenv(fa.CONFIG_ENV, raising=False)
    monkeypatch.setattr(autotune, "_tuning_available", lambda device: True)
    fresh = autotune._Autotuner(timer=ScriptedTimer([5.0]))
    monkeypatch.setattr(autotune, "_AUTOTUNER", fresh)
    return fresh


def test_tuning_picks_the_fastest_candidate_and_results_are_exact(tuner):
    """Scripted: each kernel's 2nd candidate is fastest; it is chosen and cached, and the output
    and all gradients (the atomically accumulated bias one included) match float64."""
    dtype, head_dim = torch.float32, 16
    candidates = {kernel: fa.candidate_block_configs(kernel, head_dim, dtype)
                  for kernel in fa.KERNELS}
    assert {len(configs) for configs in candidates.values()} == {2}  # the script's premise
    tuner.timer = ScriptedTimer([5.0, 1.0])
    q, k, v, kwargs = make_case(PREFIX, dtype, 40, head_dim=head_dim, seed=3)
    check_against_float64(PREFIX, dtype, q, k, v, kwargs, fwd=None, bwd=None)
    assert tuner.timer.calls == 6  # 2 candidates x 3 kernels, each timed once
    for kernel in fa.KERNELS:
        key = autotune._tuning_key(kernel, q, 40, PREFIX, True, True)
        assert tuner.cache[key] == candidates[kernel][1] != candidates[kernel][0]
    chosen = fa.selected_block_configs(q, 40, PREFIX, has_segments=True, has_bias=True)
    assert chosen == {kernel: configs[1] for kernel, configs in candidates.items()}

    # Same key (same length bucket): cached, nothing timed; a new bucket is tuned again.
    q, k, v, kwargs = make_case(PREFIX, dtype, 33, head_dim=head_dim, seed=4)
    check_against_float64(PREFIX, dtype, q, k, v, kwargs, fwd=None, bwd=None)
    assert tuner.timer.calls == 6
    q, k, v, kwargs = make_case(PREFIX, dtype, 130, head_dim=head_dim, batch=1, heads=1,
                                bias=False, seed=4)
    with torch.no_grad():
        fa.flash_attention(q, k, v, PREFIX, **kwargs)
    assert tuner.timer.calls == 8  # forward only: 2 candidates


def test_failing_candidates_are_skipped(tuner):
    """A candidate that cannot launch is skipped; when none can, the error says so."""
    candidates = [BlockConfig(16, 16), BlockConfig(32, 32), BlockConfig(64, 64)]

    def launch(config):
        if config.block_m == 16:
            raise OutOfResources(232448 + 1024, 232448, "shared memory")
        if config.block_m == 64:
            raise CompilationError("kernel.py", None, "ptxas: too many registers")

    tuner.timer = ScriptedTimer([1.0])
    assert tuner.choose(("k",), candidates, launch) == BlockConfig(32, 32)

    def never(config):
        raise OutOfResources(232448 + 1024, 232448, "shared memory")

    with pytest.raises(RuntimeError, match="no tile config could launch"):
        tuner.choose(("other",), candidates, never)

    def bug(config):  # anything but running out of resources / a failed compile is raised
        raise TypeError("unexpected keyword argument 'BLOCK_Q'")

    with pytest.raises(TypeError, match="BLOCK_Q"):
        tuner.choose(("bug",), candidates, bug)

    # running out of memory while timing is no candidate's fault: the default tiles, untimed
    def out_of_memory(config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    default = BlockConfig(64, 64)
    assert tuner.choose(("oom",), candidates, out_of_memory, default) == default
    assert tuner.cache[("oom",)] == default
    with pytest.raises(torch.cuda.OutOfMemoryError):  # no default: the error itself
        tuner.choose(("oom2",), candidates, out_of_memory)


CANDIDATES = [BlockConfig(16, 16), BlockConfig(32, 32), BlockConfig(64, 64)]


def _never_timed(fn):
    raise AssertionError("timed although cached")


def test_tuned_tiles_persist_on_disk(_cache_file):
    """A second tuner (a resumed run's process) reads the first one's choice from the file and
    times nothing; another key is tuned and merged into the same file, written atomically."""
    first = autotune._Autotuner(timer=ScriptedTimer([5.0, 1.0, 3.0]))
    key = ("fwd", 1, True, True, False, 64, torch.bfloat16, 1024, "NVIDIA H100", "triton 3.6")
    assert first.choose(key, CANDIDATES, lambda config: None) == CANDIDATES[1]
    data = json.loads(_cache_file.read_text())
    assert data["version"] == 1
    assert data["entries"] == {autotune._key_text(key): {
        "block_m": 32, "block_n": 32, "num_warps": 4, "num_stages": 2}}
    assert sorted(p.name for p in _cache_file.parent.iterdir()) == ["autotune.json"]  # no temp

    resumed = autotune._Autotuner(timer=_never_timed)
    assert resumed.lookup(key, CANDIDATES) == CANDIDATES[1]
    assert resumed.choose(key, CANDIDATES, lambda config: None) == CANDIDATES[1]

    other_gpu = (*key[:-2], "NVIDIA A100-SXM4-80GB", key[-1])
    assert resumed.lookup(other_gpu, CANDIDATES) is None
    resumed.timer = ScriptedTimer([1.0, 5.0, 5.0])
    assert resumed.choose(other_gpu, CANDIDATES, lambda config: None) == CANDIDATES[0]
    assert len(json.loads(_cache_file.read_text())["entries"]) == 2  # merged, not replaced
    # a cached choice that is no longer a candidate (the candidates changed): retuned
    resumed.cache.clear()
    resumed.timer = ScriptedTimer([5.0, 1.0])
    assert resumed.choose(other_gpu, CANDIDATES[1:], lambda config: None) == CANDIDATES[2]


def test_tuning_key_names_the_gpu_and_triton(monkeypatch):
    q = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    h100 = autotune._tuning_key("fwd", q, 40, PREFIX, False, False)
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    a100 = autotune._tuning_key("fwd", q, 40, PREFIX, False, False)
    assert h100 != a100 and h100[:-2] == a100[:-2]
    assert "NVIDIA H100 80GB HBM3" in h100 and f"triton {autotune.triton.__version__}" in h100


@pytest.mark.parametrize("text", ["{not json", '{"version": 99, "entries": {}}', "[]"])
def test_unreadable_cache_warns_and_retunes(_cache_file, text):
    _cache_file.write_text(text)
    tuner = autotune._Autotuner(timer=ScriptedTimer([5.0, 1.0, 5.0]))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert tuner.choose(("k",), CANDIDATES, lambda config: None) == CANDIDATES[1]
    assert tuner.timer.calls == 3
    assert autotune._key_text(("k",)) in json.loads(_cache_file.read_text())["entries"]


def test_cache_off(_cache_file, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, "off")
    assert autotune.autotune_cache_path() is None
    tuner = autotune._Autotuner(timer=ScriptedTimer([1.0]))
    assert tuner.choose(("k",), CANDIDATES, lambda config: None) == CANDIDATES[0]
    assert not _cache_file.exists()
    monkeypatch.delenv(autotune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert autotune.autotune_cache_path() == autotune.Path("/somewhere/megarch/autotune.json")


def test_no_tuning_without_a_gpu(monkeypatch):
    """CPU / interpreter: the fixed defaults, and the timer is never called."""
    monkeypatch.delenv(fa.CONFIG_ENV, raising=False)

    def fail(fn):
        raise AssertionError("timed without a GPU")

    monkeypatch.setattr(autotune, "_AUTOTUNER", autotune._Autotuner(timer=fail))
    q = torch.zeros(1, 2, 40, 64, dtype=torch.float16)
    fwd, (dkdv, dq) = fa.default_block_configs(64, torch.float16)
    assert fa.selected_block_configs(q, 40, PREFIX) == {"fwd": fwd, "dkdv": dkdv, "dq": dq}
    q, k, v, kwargs = make_case(PREFIX, torch.float32, 40, bias=False, seed=5)
    check_against_float64(PREFIX, torch.float32, q, k, v, kwargs, fwd=None, bwd=None)


def test_forced_configs_from_the_environment(tuner, monkeypatch):
    assert fa.forced_block_configs("") == {} and fa.forced_block_configs("auto") == {}
    assert fa.forced_block_configs("default") is None
    assert fa.forced_block_configs("fwd=64x32x4x2, bwd=32x64x4x3") == {
        "fwd": BlockConfig(64, 32, 4, 2), "dkdv": BlockConfig(32, 64, 4, 3),
        "dq": BlockConfig(32, 64, 4, 3)}
    for bad, match in (("fwd=64x32", "BLOCK_MxBLOCK_N"), ("bwd:32x32x4x2", "KERNEL="),
                       ("fwd=24x32x4x2", "power of two")):
        with pytest.raises(ValueError, match=match):
            fa.forced_block_configs(bad)

    def fail(fn):
        raise AssertionError("tuned although forced")

    tuner.timer = fail
    q = torch.zeros(1, 2, 40, 16)
    monkeypatch.setenv(fa.CONFIG_ENV, "default")
    assert fa.selected_block_configs(q, 40, PREFIX)["dq"] == fa.default_block_configs(
        16, torch.float32)[1][1]
    monkeypatch.setenv(fa.CONFIG_ENV, "fwd=16x16x4x2,bwd=16x32x4x2")
    q, k, v, kwargs = make_case(PREFIX, torch.float32, 40, seed=6)
    check_against_float64(PREFIX, torch.float32, q, k, v, kwargs, fwd=None, bwd=None)
    assert fa.selected_block_configs(q, 40, PREFIX)["dkdv"] == BlockConfig(16, 32, 4, 2)


def _candidate_triples(head_dim: int, dtype: torch.dtype):
    lists = [fa.candidate_block_configs(kernel, head_dim, dtype) for kernel in fa.KERNELS]
    count = max(map(len, lists))
    return [tuple(configs[i % len(configs)] for configs in lists) for i in range(count)]


@pytest.mark.parametrize("head_dim", [64])
def test_every_candidate_matches_the_reference(head_dim):
    """Tiles never change the result: each candidate (fwd, dK/dV, dQ) against float64."""
    dtype = torch.float16
    for index, (fwd, dkdv, dq) in enumerate(_candidate_triples(head_dim, dtype)):
        q, k, v, kwargs = make_case(PREFIX, dtype, 70, head_dim=head_dim, batch=1, heads=1,
                                    seed=90 + index)
        check_against_float64(PREFIX, dtype, q, k, v, kwargs, fwd=fwd, bwd=(dkdv, dq))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("mode", [fa.CAUSAL, fa.PREFIX, fa.BIDIRECTIONAL, fa.CROSS])
def test_every_candidate_every_mode(mode, head_dim, dtype):
    for index, (fwd, dkdv, dq) in enumerate(_candidate_triples(head_dim, dtype)):
        k_len = 97 if mode == fa.CROSS else None
        q, k, v, kwargs = make_case(mode, dtype, 150, k_len, head_dim=head_dim, batch=1,
                                    seed=7 * index + mode)
        check_against_float64(mode, dtype, q, k, v, kwargs, fwd=fwd, bwd=(dkdv, dq))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or fa._interpreting(),
                    reason="needs CUDA and TRITON_INTERPRET unset")
@pytest.mark.parametrize("mode", [fa.CAUSAL, fa.PREFIX])
def test_gpu_autotuning(monkeypatch, mode):
    """Real tuning on a GPU: every kernel gets a candidate, results match float64."""
    monkeypatch.delenv(fa.CONFIG_ENV, raising=False)
    monkeypatch.setattr(autotune, "_AUTOTUNER", autotune._Autotuner())
    dtype, head_dim = torch.bfloat16, 64
    q, k, v, kwargs = make_case(mode, dtype, 700, head_dim=head_dim, segments=False,
                                bias=mode == fa.PREFIX, seed=40 + mode, device="cuda")
    check_against_float64(mode, dtype, q, k, v, kwargs, fwd=None, bwd=None)
    chosen = fa.selected_block_configs(q, 700, mode, has_bias=mode == fa.PREFIX)
    for kernel in fa.KERNELS:
        assert chosen[kernel] in fa.candidate_block_configs(kernel, head_dim, dtype)
    assert len(autotune._AUTOTUNER.cache) == 3
