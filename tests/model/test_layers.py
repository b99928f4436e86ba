"""RMS norm, GEGLU and the apex detection against plain formulas."""

import math
import sys
import types
import warnings

import pytest
import torch

from megarch.model import layers
from megarch.model.layers import FeedForward, RMSNorm


def test_rms_norm_matches_formula_without_mean_subtraction():
    torch.manual_seed(0)
    norm = RMSNorm(6, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 6) + 5.0  # a large mean: a LayerNorm would remove it, RMS does not
    got = norm(x)
    for b in range(2):
        for t in range(3):
            row = [float(v) for v in x[b, t]]
            rms = math.sqrt(sum(v * v for v in row) / 6 + 1e-6)
            want = [v / rms * float(w) for v, w in zip(row, norm.weight.detach(), strict=True)]
            assert got[b, t].tolist() == pytest.approx(want, rel=1e-5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    assert list(dict(norm.named_parameters())) == ["weight"]  # no bias


def test_geglu_matches_formula_and_has_no_biases():
    torch.manual_seed(0)
    ff = FeedForward(4, 6)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    ff = ff.double()
    gate = x @ ff.wi_gate.weight.T
    gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    want = (gelu * (x @ ff.wi_up.weight.T)) @ ff.wo.weight.T
    assert torch.allclose(ff(x), want, atol=1e-12)
    assert sorted(n for n, _ in ff.named_parameters()) == [
        "wi_gate.weight", "wi_up.weight", "wo.weight"]


@pytest.fixture
def fake_apex(monkeypatch):
    """Install a stand-in ``apex`` package; yields a function to populate it."""
    layers.apex_rms_norm.cache_clear()

    def install(nvidia: bool):
        apex = types.ModuleType("apex")
        normalization = types.ModuleType("apex.normalization")
        fused = types.ModuleType("apex.normalization.fused_layer_norm")
        fused.fused_rms_norm_affine = lambda x, w, shape, eps: "fused"
        if nvidia:
            normalization.FusedRMSNorm = object
        apex.normalization, normalization.fused_layer_norm = normalization, fused
        for name, mod in (("apex", apex), ("apex.normalization", normalization),
                          ("apex.normalization.fused_layer_norm", fused)):
            monkeypatch.setitem(sys.modules, name, mod)
        return fused.fused_rms_norm_affine

    yield install
    layers.apex_rms_norm.cache_clear()


def test_nvidia_apex_is_used_only_when_it_is_nvidias(fake_apex):
    fn = fake_apex(nvidia=True)
    assert layers.apex_rms_norm() is fn
    layers.apex_rms_norm.cache_clear()
    fake_apex(nvidia=False)  # a different package that happens to be called apex
    assert layers.apex_rms_norm() is None


def test_cpu_tensors_never_take_the_fused_path(fake_apex):
    fake_apex(nvidia=True)
    out = RMSNorm(4)(torch.ones(1, 4))
    assert isinstance(out, torch.Tensor)


def test_missing_apex_is_silent(monkeypatch):
    layers.apex_rms_norm.cache_clear()
    monkeypatch.setitem(sys.modules, "apex", None)  # import apex raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layers.apex_rms_norm() is None
    layers.apex_rms_norm.cache_clear()
