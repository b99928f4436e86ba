"""tools/estimate_memory.py: parameter counts per rank against the models' real shards."""

from __future__ import annotations

import pytest

from megarch.config.presets import tiny_model
from megarch.model import build_model
from megarch.parallel import tp_split_dim
from tools.estimate_memory import estimate, parameters_per_rank


@pytest.mark.parametrize("arch", ["causal_decoder", "encoder_decoder"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parameters_per_rank_match_the_tp_shards(arch, tp):
    cfg = tiny_model(arch)
    model = build_model(cfg, "meta")
    shard = sum(p.numel() // (tp if tp_split_dim(n) is not None else 1)
                for n, p in model.named_parameters())
    assert parameters_per_rank(cfg, tp) == shard


def test_zero1_divides_optimizer_state_and_tp_divides_weights():
    base = estimate([], "cd_flm", 1, 1, 8, zero1=False)
    zero = estimate([], "cd_flm", 1, 1, 8, zero1=True)
    tp2 = estimate(["--optim.name", "adamw"], "cd_flm", 2, 1, 4, zero1=False)
    adam = estimate(["--optim.name", "adamw"], "cd_flm", 1, 1, 8, zero1=True)
    assert zero["optimizer_GiB"] == pytest.approx(base["optimizer_GiB"] / 8)
    assert tp2["weights_GiB"] == pytest.approx(adam["weights_GiB"] / 2, rel=1e-3)
    assert 4.0 < base["parameters_per_rank_M"] / 1e3 < 5.5  # the study's 4.8B decoder
    assert base["step_PFLOP"] == pytest.approx(tp2["step_PFLOP"])
