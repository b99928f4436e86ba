"""megarch's Adafactor in one process is ``torch.optim.Adafactor``, bit for bit.

The reference is the installed torch's own optimizer: the same parameters and gradients
through both must give bitwise-equal parameters and state (``step``, ``row_var``, ``col_var``,
``variance``) after every step, and state dicts must move between the two.
"""

from __future__ import annotations

import pytest
import torch

from megarch.training.adafactor import Adafactor, TensorParallelLayout

# a matrix, a vector, a 3-D tensor (factored over its last two dims), a tall matrix
SHAPES = [(6, 5), (7,), (3, 4, 5), (9, 2)]
LRS = [0.05, 0.05, 0.02, 0.3, 0.9, 0.01]  # changes every step; step 5: lr > 1 / sqrt(5)


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _grads(step: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    # the first gradient is tiny: in float32 the mean of row_var falls under eps1 (clamped)
    # and the variance under eps1, not under eps1^2 (not clamped)
    scale = 1e-6 if step == 0 else 1.0
    return [scale * torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _run(optimizer: torch.optim.Optimizer, params: list, steps: range, dtype: torch.dtype):
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = LRS[step]
        for param, grad in zip(params, _grads(step, dtype), strict=True):
            param.grad = grad
        optimizer.step()


def _assert_same(ours: Adafactor, ref: torch.optim.Optimizer, params: list, ref_params: list):
    for param, ref_param in zip(params, ref_params, strict=True):
        assert torch.equal(param, ref_param)
        state, ref_state = ours.state[param], ref.state[ref_param]
        assert set(state) == set(ref_state)
        for key, value in ref_state.items():
            assert state[key].shape == value.shape and state[key].dtype == value.dtype, key
            assert torch.equal(state[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [
    {"weight_decay": 0.1},
    {"weight_decay": 0.0, "maximize": True, "eps": (1e-20, 1e-3), "d": 1.5,
     "beta2_decay": -0.5},
])
def test_matches_torch_adafactor_bitwise(dtype, options):
    ref_params = _params(dtype)
    params = _clone(ref_params)
    ref = torch.optim.Adafactor(ref_params, lr=LRS[0], **options)
    ours = Adafactor(params, lr=LRS[0], **options)
    for step in range(len(LRS)):
        _run(ref, ref_params, range(step, step + 1), dtype)
        _run(ours, params, range(step, step + 1), dtype)
        _assert_same(ours, ref, params, ref_params)
    assert ours.state[params[0]]["step"].item() == len(LRS)
    # the parameters moved, so equality above is not trivial
    assert not torch.equal(params[0], _params(dtype)[0])


def test_torch_state_dict_loads_and_continues_identically(tmp_path):
    ref_params = _params(torch.float32)
    ref = torch.optim.Adafactor(ref_params, lr=LRS[0], weight_decay=0.05)
    _run(ref, ref_params, range(3), torch.float32)
    torch.save(ref.state_dict(), tmp_path / "optimizer.pt")
    params = _clone(ref_params)
    ours = Adafactor(params, lr=1.0)  # hyper-parameters come from the state dict
    ours.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    assert ours.param_groups[0]["weight_decay"] == 0.05
    _run(ref, ref_params, range(3, 6), torch.float32)
    _run(ours, params, range(3, 6), torch.float32)
    _assert_same(ours, ref, params, ref_params)
    # and back: ours loads into torch's
    back = torch.optim.Adafactor(_clone(params), lr=1.0)
    back.load_state_dict(ours.state_dict())
    assert back.state_dict()["param_groups"] == ours.state_dict()["param_groups"]


def test_untouched_parameters_and_layout_errors():
    params = _params(torch.float32)
    ours = Adafactor(params)
    params[0].grad = torch.ones_like(params[0])
    before = params[1].detach().clone()
    ours.step()
    assert torch.equal(params[1], before) and params[1] not in ours.state
    with pytest.raises(ValueError, match="along dim 2"):
        Adafactor(params, tp_layout=TensorParallelLayout(None, {params[0]: 2}))
    with pytest.raises(ValueError, match="d should be >= 1"):
        Adafactor(params, d=0.5)


def test_a_one_rank_layout_is_the_plain_update():
    """A layout whose group is None (one process) shards nothing: torch's update."""
    ref_params = _params(torch.float32)
    params = _clone(ref_params)
    bound = Adafactor.with_layout(TensorParallelLayout(None, {p: 0 for p in params}))
    ours = bound(params, weight_decay=0.1)
    assert isinstance(ours, Adafactor) and ours.tp_layout is bound.tp_layout
    ref = torch.optim.Adafactor(ref_params, weight_decay=0.1)
    _run(ours, params, range(3), torch.float32)
    _run(ref, ref_params, range(3), torch.float32)
    _assert_same(ours, ref, params, ref_params)
