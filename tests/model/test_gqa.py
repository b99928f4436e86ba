"""Grouped-query and multi-query attention (``model.n_kv_heads``) in the model.

The independent reference is the multi-head model whose k/v weights are the GQA ones repeated
for each query-head group (query head h reads KV head h // group): its outputs must be the GQA
model's, and its k/v gradients summed over each group the GQA model's k/v gradients. The
kernel path (Triton interpreter, as in test_kernel_dispatch) must match the reference path,
and read the KV heads unrepeated; the KV cache must hold only the KV heads and give the plain
forward's logits; the closed-form parameter counts must count the built model.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megarch.config.overrides import ConfigError
from megarch.config.presets import tiny_model
from megarch.config.train import get_train_preset
from megarch.model import KVCache, build_model
from megarch.model.flops import config_parameter_count, model_flops_per_sample
from tests.model.test_kernel_dispatch import _batch

attention_module = importlib.import_module("megarch.model.attention")  # the module, not the fn
ARCHS = ("causal_decoder", "nonc_decoder", "encoder_decoder")
HEADS, HEAD_DIM = 4, 16  # tiny_model's


def gqa_config(arch: str, kv_heads: int | None, **changes):
    cfg = tiny_model(arch)
    cfg.n_kv_heads = kv_heads
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg.validate()


def _is_kv(name: str) -> bool:
    return name.endswith((".k.weight", ".v.weight"))


def repeated_kv_state(state: dict[str, torch.Tensor], kv_heads: int) -> dict[str, torch.Tensor]:
    """The MHA state dict equivalent to a GQA one: each KV head's rows of k and v repeated for
    the query heads of its group, in head order (written here by hand, not the model's code)."""
    group = HEADS // kv_heads
    out = {}
    for name, t in state.items():
        if _is_kv(name):
            rows = [t[(h // group) * HEAD_DIM:(h // group + 1) * HEAD_DIM] for h in range(HEADS)]
            t = torch.cat(rows)
        out[name] = t.clone()
    return out


def _forward_backward(model, batch):
    model.zero_grad()
    logits = model(**batch)
    (logits.square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_gqa_equals_mha_with_repeated_kv_weights(arch, kv_heads, monkeypatch):
    """Outputs equal; the MHA k/v gradients summed over each group are the GQA ones; every
    other gradient is the same (decoder self-attention and encoder-decoder cross-attention)."""
    monkeypatch.setenv("MEGARCH_ATTENTION", "reference")
    gqa = build_model(gqa_config(arch, kv_heads), seed=3).double()
    mha = build_model(gqa_config(arch, None), seed=3).double()
    mha.load_state_dict(repeated_kv_state(gqa.state_dict(), kv_heads))
    kv_names = [n for n, _ in gqa.named_parameters() if _is_kv(n)]
    assert any(".cross." in n for n in kv_names) == (arch == "encoder_decoder")
    for name in kv_names:
        assert gqa.get_parameter(name).shape == (kv_heads * HEAD_DIM, 64)
    batch = _batch("encoder_decoder" if arch == "encoder_decoder" else "decoder",
                   torch.Generator().manual_seed(1))
    gqa_logits, gqa_grads = _forward_backward(gqa, batch)
    mha_logits, mha_grads = _forward_backward(mha, batch)
    torch.testing.assert_close(gqa_logits, mha_logits, rtol=1e-10, atol=1e-10)
    group = HEADS // kv_heads
    for name, grad in gqa_grads.items():
        want = mha_grads[name]
        if _is_kv(name):  # [heads * hd, d] -> [kv_heads, group, hd, d], summed over the group
            want = want.view(kv_heads, group, HEAD_DIM, -1).sum(1).reshape(grad.shape)
        torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12, msg=name)
    # The grouping matters: another assignment of KV heads to query heads gives other logits.
    if kv_heads == 2:
        swapped = {n: (t.view(2, HEAD_DIM, -1).flip(0).reshape(t.shape) if _is_kv(n) else t)
                   for n, t in gqa.state_dict().items()}
        mha.load_state_dict(repeated_kv_state(swapped, kv_heads))
        with torch.no_grad():
            assert not torch.allclose(mha(**batch), gqa_logits, atol=1e-6)


@pytest.mark.parametrize(("arch", "kv_heads"), [("causal_decoder", 2), ("nonc_decoder", 1),
                                                ("encoder_decoder", 2)])
def test_kernel_path_matches_reference_with_gqa(arch, kv_heads, monkeypatch):
    """The Triton kernel (interpreter) gets k/v with the KV heads only, and gives the reference
    path's logits and gradients."""
    torch.manual_seed(0)
    model = build_model(gqa_config(arch, kv_heads))
    batch = _batch("encoder_decoder" if arch == "encoder_decoder" else "decoder",
                   torch.Generator().manual_seed(1))
    kv_shapes = []
    kernel = attention_module._kernel_attention

    def recording(q, k, v, *args, **kwargs):
        kv_shapes.append((q.shape[1], k.shape[1], v.shape[1]))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention_module, "_kernel_attention", recording)
    monkeypatch.setenv("MEGARCH_ATTENTION", "reference")
    ref_logits, ref_grads = _forward_backward(model, batch)
    assert not kv_shapes
    monkeypatch.setenv("MEGARCH_ATTENTION", "kernel")
    ker_logits, ker_grads = _forward_backward(model, batch)
    layers = 2 + (4 if arch == "encoder_decoder" else 0)  # + decoder self and cross
    assert kv_shapes == [(HEADS, kv_heads, kv_heads)] * layers
    torch.testing.assert_close(ker_logits, ref_logits, rtol=1e-4, atol=1e-4)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ker_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("position", ["t5_relative", "rotary"])
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_holds_kv_heads_and_gives_the_plain_forward(arch, position):
    """Prefill 5 tokens, then 4 steps of one: each step's logits are the full forward's at that
    position; every cached tensor (self and cross) has n_kv_heads heads."""
    model = build_model(gqa_config(arch, 2, position=position, tie_embeddings=False),
                        seed=2).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (2, 9), generator=gen)
    cache = KVCache(9)
    with torch.no_grad():
        if arch == "encoder_decoder":
            encoder_out = model.encode(torch.randint(0, 500, (2, 6), generator=gen))
            full = model.decode(tokens, encoder_out)
            steps = [model.decode(tokens[:, :5], encoder_out, cache=cache)[:, -1]]
        else:
            full = model(tokens=tokens, prefix_len=torch.tensor([5, 5]))
            steps = [model(tokens=tokens[:, :5], prefix_len=torch.tensor([5, 5]),
                           cache=cache)[:, -1]]
        for pos in range(5, 9):
            positions = torch.full((2, 1), pos)
            new = tokens[:, pos:pos + 1]
            if arch == "encoder_decoder":
                out = model.decode(new, encoder_out, decoder_positions=positions, cache=cache)
            else:
                out = model(tokens=new, positions=positions, cache=cache)
            steps.append(out[:, 0])
    got = torch.stack(steps, dim=1)
    want = full[:, 4:]
    assert float((got - want).norm() / want.norm()) <= 1e-5
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, 2, 9, HEAD_DIM)
        if arch == "encoder_decoder":
            assert all(t.shape == (2, 2, 6, HEAD_DIM) for t in layer.cross)


@pytest.mark.parametrize("rel_bias_shared", [False, True])
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_counts_the_built_model(arch, kv_heads, rel_bias_shared):
    from tools.estimate_memory import parameters_per_rank

    cfg = gqa_config(arch, kv_heads, rel_bias_shared=rel_bias_shared)
    real = sum(p.numel() for p in build_model(cfg, "meta").parameters())
    assert config_parameter_count(cfg) == real
    if not rel_bias_shared:  # the estimator's per-rank counts know no shared table
        assert parameters_per_rank(cfg) == real


def test_gqa_flops_change_only_the_kv_projections():
    """Against the multi-head count: fewer k/v projection FLOPs (2 * d * (a - k) per k and v
    per token, forward), the same attention FLOPs."""
    d, hd = 64, HEAD_DIM
    for arch in ("causal_decoder", "encoder_decoder"):
        mha, mqa = gqa_config(arch, None), gqa_config(arch, 1)
        saved = 2 * 2 * d * (HEADS - 1) * hd  # k and v, per token and layer, forward
        if arch == "causal_decoder":
            got = model_flops_per_sample(mha, 10, training=False) - model_flops_per_sample(
                mqa, 10, training=False)
            assert got == 10 * 2 * saved
        else:
            enc, dec = 7, 5
            got = (model_flops_per_sample(mha, encoder_len=enc, decoder_len=dec, training=False)
                   - model_flops_per_sample(mqa, encoder_len=enc, decoder_len=dec,
                                            training=False))
            # encoder self (7 tokens), decoder self (5), cross k/v on the encoder output (7)
            assert got == (2 * enc + 2 * dec + 2 * enc) * saved


@pytest.mark.parametrize(("changes", "words"), [
    (dict(n_kv_heads=3), ["model.n_kv_heads=3", "divisor", "model.n_heads=4"]),
    (dict(n_kv_heads=0), ["model.n_kv_heads=0", "divisor"]),
    (dict(n_kv_heads=8), ["model.n_kv_heads=8", "divisor"]),
])
def test_n_kv_heads_validation_names_the_field_and_fix(changes, words):
    cfg = tiny_model("causal_decoder")
    for key, value in changes.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    for word in words:
        assert word in str(err.value)


def test_tp_must_divide_the_kv_heads(monkeypatch):
    """At config validation (TrainConfig) and at build: one error naming both fields."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = get_train_preset("cd_flm_tiny")
    cfg.model.n_kv_heads, cfg.parallel.tp = 1, 2
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=1 is not divisible by "
                                          r"parallel\.tp=2"):
        cfg.validate()
    cfg.parallel.tp = 1
    cfg.validate()
    cfg.model.n_kv_heads, cfg.parallel.tp = 2, 2
    cfg.validate()
    with pytest.raises(ValueError, match=r"model\.n_kv_heads=1 .*parallel\.tp=2"):
        gqa_config("causal_decoder", 1).validate_tp(2)


def test_configs_saved_before_n_kv_heads_load_and_fit(tmp_path):
    """A checkpoint config without the field (multi-head) reads as n_kv_heads None and fits a
    model with n_kv_heads = n_heads spelt out; one with other KV heads is refused by name."""
    import json

    from megarch.config.train import config_from_json
    from megarch.training.checkpoint import TrainState, find_latest, save_checkpoint
    from megarch.training.optim import build_optimizer
    from megarch.training.resume import check_shapes

    cfg = get_train_preset("cd_flm_tiny")
    cfg.model.vocab_size = 512
    old = json.loads(cfg.to_json())
    del old["model"]["n_kv_heads"]
    assert config_from_json(json.dumps(old)).model.n_kv_heads is None
    model = build_model(cfg.model)
    run = str(tmp_path / "run")
    save_checkpoint(run, TrainState(), model, build_optimizer(cfg.optim, model), json.dumps(old))
    run = find_latest(run)
    cfg.model.n_kv_heads = HEADS
    check_shapes(run, cfg.model)
    cfg.model.n_kv_heads = 2
    with pytest.raises(ConfigError, match=r"model\.n_kv_heads=4 there, 2 here"):
        check_shapes(run, cfg.model)


def test_reshard_tool_refuses_a_tp_that_splits_a_kv_head():
    """One KV head of 16 rows splits evenly in two, but not as whole heads: refused by name."""
    from megarch.training.checkpoint import CheckpointError
    from tools.reshard_checkpoint import target_config

    cfg = get_train_preset("cd_flm_tiny")
    cfg.model.vocab_size, cfg.model.n_kv_heads = 512, 1
    with pytest.raises(CheckpointError, match=r"--tp 2 .*model\.n_kv_heads=1"):
        target_config(cfg, 2, 1)
    cfg.model.n_kv_heads = 2
    assert target_config(cfg, 2, 1).parallel.tp == 2
