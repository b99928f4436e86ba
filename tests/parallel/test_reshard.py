"""megarch.parallel.reshard: TP1 -> TPn -> TP1 round trips of model and AdamW state."""

from __future__ import annotations

import pytest
import torch

from megarch.model import build_model
from megarch.parallel.reshard import (
    merge_tp_model,
    merge_tp_optimizer,
    optimizer_param_names,
    split_tp_model,
    split_tp_optimizer,
)
from tests.parallel.helpers import tiny_batch, tiny_config


@pytest.mark.parametrize("tp", [2, 4])
def test_model_and_adamw_state_round_trip(tp):
    torch.manual_seed(0)
    model = build_model(tiny_config("encoder_decoder"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tiny_batch("encoder_decoder", 0)
    batch = {k: v for k, v in batch.items() if not k.startswith("decoder_l")}
    model(**batch).square().mean().backward()
    opt.step()
    full, full_opt = model.state_dict(), opt.state_dict()
    names = optimizer_param_names(model, opt)
    shards = split_tp_model(full, tp)
    assert shards[1]["embed.weight"].shape[0] == 96 // tp
    assert shards[0]["encoder_blocks.0.attn.o.weight"].shape[1] == 32 // tp
    merged = merge_tp_model(shards)
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    opt_shards = split_tp_optimizer(full_opt, names, tp)
    shapes = [shards[0][n].shape for n in names]
    back = merge_tp_optimizer(opt_shards, names, shapes)
    for index, state in full_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][index][key], value), (names[index], key)


def test_factored_optimizer_state_is_refused():
    shards = [{"state": {0: {"row": torch.zeros(3)}}, "param_groups": []}] * 2
    with pytest.raises(ValueError, match="factored"):
        merge_tp_optimizer(shards, ["blocks.0.ff.wi_up.weight"], [torch.Size([3, 4])])
