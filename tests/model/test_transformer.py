"""The models: parameter counts, the CD/ND identity, mask wiring, tied logits, checkpointing."""

import dataclasses

import pytest
import torch

from megarch.config.presets import get_model_preset
from megarch.model import DecoderLM, EncoderDecoderLM, build_model, count_parameters


def _closed_form(cfg) -> int:
    """Parameters counted by hand from the architecture (PAPER.md), module by module."""
    d, heads, dh, f, vocab = cfg.d_model, cfg.n_heads, cfg.kv_dim, cfg.d_ff, cfg.vocab_size
    attention = 4 * d * heads * dh  # q, k, v, o without biases
    geglu = 3 * d * f  # gate, up, down
    norm = d
    rel_bias = 32 * heads  # one table per layer
    layer = attention + geglu + 2 * norm + rel_bias
    if cfg.arch != "encoder_decoder":
        return vocab * d + cfg.n_layers * layer + norm  # tied embedding, final norm
    decoder_layer = layer + attention + norm  # + cross-attention and its norm
    return vocab * d + cfg.n_layers * (layer) + norm + cfg.decoder_layers * decoder_layer + norm


@pytest.mark.parametrize("name,paper", [("cd_4.8b", 4.8e9), ("nd_4.8b", 4.8e9),
                                        ("ed_11b", 11.0e9)])
def test_full_scale_parameter_counts_on_meta(name, paper):
    cfg = get_model_preset(name)
    model = build_model(cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    count = count_parameters(model)
    assert count == _closed_form(cfg)
    assert abs(count / paper - 1) < 0.03, count


def test_ed_has_about_twice_the_decoder_parameters():
    cd = count_parameters(build_model(get_model_preset("cd_4.8b"), device="meta"))
    ed = count_parameters(build_model(get_model_preset("ed_11b"), device="meta"))
    assert 2.2 < ed / cd < 2.4  # 2x the blocks, + cross-attention, one shared embedding


def _tiny(arch, **changes):
    short = {"causal_decoder": "cd", "nonc_decoder": "nd", "encoder_decoder": "ed"}[arch]
    return dataclasses.replace(get_model_preset(f"{short}_tiny"), **changes)


def test_cd_and_nd_are_one_network():
    torch.manual_seed(3)
    cd = build_model(_tiny("causal_decoder"))
    torch.manual_seed(3)
    nd = build_model(_tiny("nonc_decoder"))
    cd_state, nd_state = cd.state_dict(), nd.state_dict()
    assert list(cd_state) == list(nd_state)
    assert all(torch.equal(cd_state[k], nd_state[k]) for k in cd_state)
    tokens = torch.randint(0, 512, (2, 9))
    zero = torch.zeros(2, dtype=torch.long)
    assert torch.equal(cd(tokens), nd(tokens, prefix_len=zero))
    assert torch.equal(cd(tokens), nd(tokens, prefix_len=torch.zeros(2, 9, dtype=torch.long)))
    assert not torch.equal(cd(tokens), nd(tokens, prefix_len=torch.tensor([4, 6])))
    nd.load_state_dict(cd_state)  # adaptation: a CD checkpoint loads into ND as is


def _changed_positions(model, fields, key, row, pos):
    """Which output positions of ``row`` change when token ``pos`` of ``fields[key]`` does."""
    base = model(**fields)
    tokens = fields[key].clone()
    tokens[row, pos] = (tokens[row, pos] + 1) % 512
    new = model(**{**fields, key: tokens})
    return [not torch.equal(base[row, i], new[row, i]) for i in range(base.shape[1])]


def _bits(text):
    return [c == "1" for c in text]


@pytest.fixture(scope="module")
def decoders():
    torch.manual_seed(0)
    return {arch: build_model(_tiny(arch)).eval() for arch in ("causal_decoder", "nonc_decoder")}


def test_causal_edge(decoders):
    fields = {"tokens": torch.randint(0, 512, (2, 8)), "prefix_len": torch.tensor([5, 5])}
    model = decoders["causal_decoder"]  # ignores prefix_len
    assert _changed_positions(model, fields, "tokens", 1, 4) == _bits("00001111")


def test_prefix_boundary_per_row(decoders):
    fields = {"tokens": torch.randint(0, 512, (2, 8)), "prefix_len": torch.tensor([3, 0])}
    model = decoders["nonc_decoder"]
    assert _changed_positions(model, fields, "tokens", 0, 2) == _bits("11111111")
    assert _changed_positions(model, fields, "tokens", 0, 3) == _bits("00011111")
    assert _changed_positions(model, fields, "tokens", 0, 5) == _bits("00000111")
    assert _changed_positions(model, fields, "tokens", 1, 2) == _bits("00111111")  # prefix 0


def test_prefix_per_position_in_packed_rows(decoders):
    fields = {
        "tokens": torch.randint(0, 512, (1, 8)),
        "positions": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]),
        "segment_ids": torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]]),
        "prefix_len": torch.tensor([[2, 2, 2, 2, 6, 6, 6, 6]]),
    }
    model = decoders["nonc_decoder"]
    assert _changed_positions(model, fields, "tokens", 0, 1) == _bits("11110000")
    assert _changed_positions(model, fields, "tokens", 0, 2) == _bits("00110000")
    assert _changed_positions(model, fields, "tokens", 0, 5) == _bits("00001111")
    assert _changed_positions(model, fields, "tokens", 0, 6) == _bits("00000011")


@pytest.mark.parametrize("arch", ["causal_decoder", "nonc_decoder"])
def test_segment_boundary_and_padding(decoders, arch):
    fields = {
        "tokens": torch.randint(0, 512, (1, 8)),
        "positions": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]]),
        "segment_ids": torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]]),
        "prefix_len": torch.tensor([[3, 3, 3, 5, 5, 5, 5, 0]]),
    }
    model = decoders[arch]
    want_first = "11100000" if arch == "nonc_decoder" else "01100000"
    assert _changed_positions(model, fields, "tokens", 0, 1) == _bits(want_first)
    assert _changed_positions(model, fields, "tokens", 0, 3) == _bits("00011110")
    assert _changed_positions(model, fields, "tokens", 0, 7) == _bits("00000001")  # padding
    assert not model(**fields).isnan().any()


def test_encoder_decoder_cross_segments():
    torch.manual_seed(0)
    model = build_model(_tiny("encoder_decoder")).eval()
    fields = {
        "encoder_tokens": torch.randint(0, 512, (1, 6)),
        "encoder_positions": torch.tensor([[0, 1, 2, 0, 1, 2]]),
        "encoder_segment_ids": torch.tensor([[1, 1, 1, 2, 2, 0]]),
        "decoder_tokens": torch.randint(0, 512, (1, 6)),
        "decoder_positions": torch.tensor([[0, 1, 0, 1, 2, 0]]),
        "decoder_segment_ids": torch.tensor([[1, 1, 2, 2, 2, 0]]),
    }
    assert _changed_positions(model, fields, "encoder_tokens", 0, 2) == _bits("110000")
    assert _changed_positions(model, fields, "encoder_tokens", 0, 4) == _bits("001110")
    assert _changed_positions(model, fields, "encoder_tokens", 0, 5) == _bits("000000")
    assert _changed_positions(model, fields, "decoder_tokens", 0, 3) == _bits("000110")
    assert not model(**fields).isnan().any()


def test_tied_logits_are_scaled_embedding_products():
    torch.manual_seed(0)
    model = build_model(_tiny("causal_decoder"))
    captured = {}
    model.final_norm.register_forward_hook(lambda m, i, out: captured.update(h=out))
    logits = model(torch.randint(0, 512, (2, 5)))
    want = captured["h"] @ model.embed.weight.T / 64**0.5
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 512)
    assert torch.allclose(logits, want, atol=1e-5)
    untied = build_model(_tiny("causal_decoder", tie_embeddings=False))
    assert count_parameters(untied) == count_parameters(model) + 512 * 64


def test_activation_checkpointing_recomputes_blocks_with_the_same_result():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(_tiny("encoder_decoder", dropout=0.1,
                                  activation_checkpointing=checkpointing)).train()
        calls = []
        model.decoder_blocks[0].register_forward_pre_hook(lambda *a, calls=calls: calls.append(1))
        tokens = torch.randint(0, 512, (2, 6))
        model(encoder_tokens=tokens, decoder_tokens=tokens).square().mean().backward()
        results.append((len(calls), [p.grad.clone() for p in model.parameters()]))
    (calls_plain, grads_plain), (calls_ckpt, grads_ckpt) = results
    assert (calls_plain, calls_ckpt) == (1, 2)
    for a, b in zip(grads_plain, grads_ckpt, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_meta_model_materialises_with_the_documented_init():
    cfg = dataclasses.replace(_tiny("causal_decoder"), d_model=128, d_ff=512, vocab_size=2048)
    model = build_model(cfg, device="meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert abs(model.embed.weight.std().item() - 1.0) < 0.02
    wo = model.blocks[0].ff.wo.weight  # fan_in 512, truncated at 2 std (std factor 0.88)
    assert abs(wo.std().item() * 512**0.5 - 0.88) < 0.03
    assert torch.equal(model.final_norm.weight, torch.ones(128))


def test_rotary_models_have_no_bias_tables_and_stay_causal():
    torch.manual_seed(0)
    model = build_model(_tiny("causal_decoder", position="rotary")).eval()
    assert not any("rel_bias" in name for name, _ in model.named_parameters())
    fields = {"tokens": torch.randint(0, 512, (1, 6))}
    assert _changed_positions(model, fields, "tokens", 0, 3) == _bits("000111")


def test_wrong_class_for_arch_is_refused():
    with pytest.raises(ValueError, match="encoder_decoder"):
        EncoderDecoderLM(_tiny("causal_decoder"))
    with pytest.raises(ValueError, match="causal_decoder"):
        DecoderLM(_tiny("encoder_decoder"))


def test_bfloat16_and_autocast_keep_float32_logits_close_to_float32():
    torch.manual_seed(0)
    model = build_model(_tiny("nonc_decoder")).eval()
    fields = {"tokens": torch.randint(0, 512, (2, 7)), "prefix_len": torch.tensor([3, 0])}
    want = model(**fields)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = model(**fields)
    half = model.to(torch.bfloat16)(**fields)
    for got in (autocast, half):
        assert got.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 0.05
