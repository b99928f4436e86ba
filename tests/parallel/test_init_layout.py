"""The same seed gives the same initial weights, bitwise, at every TP / PP / virtual-stage
layout, and each parameter's partition is declared by the layer that builds it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megarch.model import build_model, build_stage
from megarch.model.layers import RMSNorm
from megarch.model.position import RelativePositionBias
from megarch.model.transformer import init_parameters
from megarch.parallel.context import ParallelContext
from megarch.parallel.spawn import spawn
from megarch.parallel.tensor_parallel import (
    gather_full_state_dict,
    partition_dims,
    set_partition_dim,
)
from tests.parallel.helpers import tiny_config

SEED = 1234

LAYOUTS = {2: [(2, 1, 1), (1, 2, 1), (1, 2, 2)], 4: [(2, 2, 1), (4, 1, 1)]}
"""World size -> the (tp, pp, virtual_stages) layouts checked against one process."""


def _config(arch: str):
    cfg = tiny_config(arch)
    cfg.n_layers = 4
    if arch == "encoder_decoder":
        cfg.n_decoder_layers = 4
    return cfg


def _rank_weights(rank: int, world: int) -> dict:
    """This rank's initial weights, TP-gathered, per (arch, layout), built as the Trainer does
    (real gloo groups)."""
    torch.set_num_threads(1)
    out = {}
    for tp, pp, virtual in LAYOUTS[world]:
        ctx = ParallelContext.build(tp=tp, pp=pp)
        for arch in ("causal_decoder", "encoder_decoder"):
            if arch == "encoder_decoder" and virtual > 1:
                continue  # interleaving is checked on the decoder
            cfg = _config(arch)
            if pp == 1:
                model = build_model(cfg, ctx=ctx, seed=SEED)
            else:
                model = build_stage(cfg, ctx, virtual_stages=virtual, seed=SEED)
            out[(arch, tp, pp, virtual)] = gather_full_state_dict(model, ctx.tp_group)
    return out


@pytest.mark.parametrize("world", sorted(LAYOUTS))
def test_same_seed_same_weights_at_every_layout(world):
    """TP2, TP4, PP2, PP2 x 2 virtual stages, TP2 x PP2; decoder and encoder-decoder: every
    parameter, gathered, is bitwise the one-process model's (embedding copies included)."""
    results = spawn(world, timeout_s=120)(_rank_weights)
    for key in results[0]:
        arch = key[0]
        reference = build_model(_config(arch), seed=SEED).state_dict()
        seen = set()
        for rank_weights in results:
            for name, tensor in rank_weights[key].items():
                assert torch.equal(tensor, reference[name]), (key, name)
                seen.add(name)
        assert seen == set(reference), key


def test_the_seed_decides_and_none_follows_the_global_rng():
    cfg = tiny_config("causal_decoder")
    a = build_model(cfg, seed=1).state_dict()
    b = build_model(cfg, seed=2).state_dict()
    assert not torch.equal(a["blocks.0.attn.q.weight"], b["blocks.0.attn.q.weight"])
    torch.manual_seed(5)
    c = build_model(cfg).state_dict()
    torch.manual_seed(5)
    d = build_model(cfg).state_dict()
    assert all(torch.equal(c[k], d[k]) for k in c)


def test_init_statistics_follow_the_full_fan_in():
    """Row-parallel layers are scaled by the whole layer's fan-in, also on a TP rank."""
    wo = set_partition_dim(nn.Linear(512, 256, bias=False), "weight", 1)  # rank 1 of 4
    init_parameters(wo, std=1.0, tp=4, tp_rank=1, seed=0)
    expected = 1.0 / 2048**0.5 * 0.8796  # std of N(0, 1) truncated at +-2, fan-in 4 x 512
    assert abs(wo.weight.std().item() / expected - 1) < 0.02
    whole = set_partition_dim(nn.Linear(2048, 256, bias=False), "weight", 1)
    init_parameters(whole, std=1.0, seed=0)
    assert torch.equal(wo.weight, whole.weight[:, 512:1024])  # the one-process tensor's chunk


def test_every_layer_declares_its_partition():
    model = build_model(tiny_config("encoder_decoder"), "meta")
    dims = partition_dims(model)
    for prefix, module in model.named_modules():
        for short, _ in module.named_parameters(recurse=False):
            dim = dims[f"{prefix}.{short}" if prefix else short]
            if isinstance(module, RMSNorm):
                assert dim is None
            elif isinstance(module, RelativePositionBias):
                assert dim == 1  # heads are columns
            elif isinstance(module, nn.Embedding):
                assert dim == 0
            else:
                leaf = prefix.rsplit(".", 1)[-1]
                assert dim == (1 if leaf in ("o", "wo") else 0), prefix


def test_a_parameter_without_an_init_rule_is_refused():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="scale: no initialisation rule for Odd"):
        init_parameters(Odd(), 1.0)
