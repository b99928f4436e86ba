"""Optimizers and schedules against closed forms, Adafactor against the study's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from megarch.config.train import OptimConfig, get_train_preset
from megarch.training.adafactor import Adafactor
from megarch.training.optim import build_optimizer, effective_lr, lr_at, set_lr


def test_constant_with_warmup():
    cfg = OptimConfig(lr=0.5, schedule="constant", warmup_steps=4)
    assert [lr_at(cfg, s, 100) for s in (1, 2, 4, 5, 99)] == [0.125, 0.25, 0.5, 0.5, 0.5]


def test_inverse_sqrt_with_warmup():
    cfg = OptimConfig(lr=0.01, schedule="inverse_sqrt", warmup_steps=10000)
    for step in (1, 5000, 10000, 10001, 40000, 131072):
        expected = 0.01 * step / 10000 if step <= 10000 else 1 / math.sqrt(step)
        assert lr_at(cfg, step, 131072) == pytest.approx(expected, rel=1e-12)


def test_cosine_closed_form():
    cfg = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    for step in (11, 35, 60, 85, 110, 200):
        t = min(1.0, (step - 10) / 100)
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * t))
        assert lr_at(cfg, step, total) == pytest.approx(expected, rel=1e-12)
    assert lr_at(cfg, 60, total) == pytest.approx(0.55e-3)  # halfway: the mean
    assert lr_at(cfg, 5, total) == pytest.approx(0.5e-3)  # warm-up


def _adafactor_step_size(step: int) -> float:
    """Run the study preset's optimizer on a vector whose normalised update is exactly 1 and
    return the relative change |dp| / RMS(p) of update ``step``."""
    cfg = get_train_preset("cd_flm").optim
    param = torch.nn.Parameter(torch.full((16,), 3.0, dtype=torch.float64))
    model = torch.nn.Module()
    model.p = param
    optimizer = build_optimizer(cfg, model)
    param.grad = torch.ones_like(param)
    optimizer.step()  # creates the state; then jump the counter to just before ``step``
    optimizer.state[param]["step"].fill_(step - 1)
    optimizer.state[param]["variance"].fill_(1.0)  # v = g^2: the update g / sqrt(v) is 1
    before = param.detach().clone()
    param.grad = torch.ones_like(param)
    set_lr(optimizer, lr_at(cfg, step, 131072))  # what the loop does before each update
    optimizer.step()
    rms = before.pow(2).mean().sqrt()
    return float(((before - param.detach()) / rms).mean())


@pytest.mark.parametrize("step", [1, 100, 9999, 10000, 10001, 40000, 131072])
def test_adafactor_reproduces_the_study_schedule(step):
    study = 1.0 / math.sqrt(max(step, 10**4))  # PAPER.md: LR = 1/sqrt(max(step, 10^4))
    assert _adafactor_step_size(step) == pytest.approx(study, rel=1e-9)
    cfg = get_train_preset("cd_flm").optim
    assert effective_lr(cfg, step, 131072) == pytest.approx(study, rel=1e-12)


def test_adafactor_settings_are_the_studys():
    cfg = get_train_preset("ed_mlm").optim
    optimizer = build_optimizer(cfg, torch.nn.Linear(4, 4, bias=False))
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, Adafactor)  # torch's algorithm, TP-exact
    assert (group["beta2_decay"], group["d"], group["eps"][1]) == (-0.8, 1.0, 1e-3)


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(OptimConfig(name="adamw", weight_decay=0.1), model)
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == 1 and decayed[0] is model[0].weight


@pytest.mark.gpu
def test_apex_fused_adam_matches_torch_adamw():
    """Where NVIDIA apex and a GPU exist, its FusedAdam gives torch's AdamW update."""
    from megarch.training.optim import apex_fused_adam

    if not torch.cuda.is_available() or apex_fused_adam() is None:
        pytest.skip("needs CUDA and NVIDIA apex")
    torch.manual_seed(0)
    reference = torch.nn.Linear(64, 64, bias=False).cuda()
    fused = torch.nn.Linear(64, 64, bias=False).cuda()
    fused.load_state_dict(reference.state_dict())
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    opt_fused = apex_fused_adam()(fused.parameters(), lr=1e-2, weight_decay=0.1,
                                  adam_w_mode=True)
    for _ in range(5):
        x = torch.randn(8, 64, device="cuda")
        for model, opt in ((reference, opt_ref), (fused, opt_fused)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    torch.testing.assert_close(fused.weight, reference.weight, rtol=1e-5, atol=1e-6)
