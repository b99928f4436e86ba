"""megarch.parallel.reshard: TP1 -> TPn -> TP1 round trips of model, AdamW and Adafactor
state; shards cut between TP sizes; the split dims of optimizer states."""

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
    state_split_dim,
    take_shard,
)
from megarch.parallel.tensor_parallel import partition_dims
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
    names, dims = optimizer_param_names(model, opt), partition_dims(model)
    shards = split_tp_model(full, tp, dims)
    assert shards[1]["embed.weight"].shape[0] == 96 // tp
    assert shards[0]["encoder_blocks.0.attn.o.weight"].shape[1] == 32 // tp
    merged = merge_tp_model(shards, dims)
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    opt_shards = split_tp_optimizer(full_opt, names, tp, dims)
    back = merge_tp_optimizer(opt_shards, names, dims)
    for index, state in full_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][index][key], value), (names[index], key)


def test_adafactor_factored_state_round_trip():
    torch.manual_seed(0)
    model = build_model(tiny_config("causal_decoder"))
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    model(**_decoder_inputs()).square().mean().backward()
    opt.step()
    full_opt, names = opt.state_dict(), optimizer_param_names(model, opt)
    index, dims = {n: i for i, n in enumerate(names)}, partition_dims(model)
    shards = split_tp_optimizer(full_opt, names, 2, dims)
    o, embed = full_opt["state"][index["blocks.0.attn.o.weight"]], \
        full_opt["state"][index["embed.weight"]]
    o1, embed1 = shards[1]["state"][index["blocks.0.attn.o.weight"]], \
        shards[1]["state"][index["embed.weight"]]
    assert torch.equal(o1["col_var"], o["col_var"][:, 16:])  # o: split along dim 1
    assert torch.equal(o1["row_var"], o["row_var"])  # replicated
    assert torch.equal(embed1["row_var"], embed["row_var"][48:])  # embed: split along dim 0
    assert torch.equal(embed1["col_var"], embed["col_var"])
    back = merge_tp_optimizer(shards, names, dims)
    for i, state in full_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][i][key], value), (names[i], key)


@pytest.mark.parametrize(("saved_tp", "tp"), [(2, 4), (4, 2), (2, 1), (1, 2), (3, 2)])
def test_take_shard_between_tp_sizes_equals_chunking_the_full_tensor(saved_tp, tp):
    full = torch.arange(12 * 5.0).reshape(12, 5)
    for dim, size in ((0, 12), (1, 5)):
        if size % saved_tp or size % tp:
            continue
        parts = list(full.chunk(saved_tp, dim))
        for rank in range(tp):
            assert torch.equal(take_shard(parts, dim, rank, tp), full.chunk(tp, dim)[rank])
    assert torch.equal(take_shard([full, full + 1], None, 1, 2), full)
    with pytest.raises(ValueError, match="does not split into tp=5"):
        take_shard(list(full.chunk(2, 0)), 0, 0, 5)


def test_state_split_dims():
    dims = partition_dims(build_model(tiny_config("causal_decoder"), "meta"))

    def split(name, key, value):
        return state_split_dim(dims[name], key, value)

    assert split("blocks.0.attn.q.weight", "exp_avg", torch.zeros(4, 4)) == 0
    assert split("blocks.0.attn.q.weight", "col_var", torch.zeros(1, 4)) is None
    assert split("blocks.0.ff.wo.weight", "col_var", torch.zeros(1, 4)) == 1
    assert split("blocks.0.ff.wo.weight", "row_var", torch.zeros(4, 1)) is None
    assert split("blocks.0.ff.wo.weight", "step", torch.tensor(3.0)) is None
    assert split("final_norm.weight", "variance", torch.zeros(4)) is None


def _decoder_inputs() -> dict:
    batch = tiny_batch("causal_decoder", 0)
    return {k: v for k, v in batch.items() if k in ("tokens", "positions", "segment_ids")}
