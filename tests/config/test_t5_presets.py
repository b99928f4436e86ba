"""The T5 v1.1 ladder: published parameter counts, HF configs, decoder-only pairs, layouts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from megarch.config.presets import get_model_preset
from megarch.config.train import get_train_preset
from megarch.model import build_model, config_parameter_count, count_parameters
from megarch.model.flops import model_flops_per_token

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.estimate_memory import A100_GIB, FIT_FRACTION, choose_layout, estimate_config  # noqa: E402

PUBLISHED = {"small": 76.9e6, "base": 247.6e6, "large": 783.2e6, "xl": 2.85e9, "xxl": 11.14e9}
"""Parameters of google/t5-v1_1-<size> (untied embeddings), as published."""
HF_SHAPES = {  # google/t5-v1_1-<size> config.json: d_model, d_ff, num_heads, num_layers
    "small": (512, 1024, 6, 8), "base": (768, 2048, 12, 12), "large": (1024, 2816, 16, 24),
    "xl": (2048, 5120, 32, 24), "xxl": (4096, 10240, 64, 24)}


@pytest.mark.parametrize("size", PUBLISHED)
def test_parameter_counts_are_the_published_ones(size):
    cfg = get_model_preset(f"ed_t5_v1_1_{size}")
    n = config_parameter_count(cfg)
    assert abs(n / PUBLISHED[size] - 1) < 0.01, n
    assert count_parameters(build_model(cfg, device="meta")) == n  # nothing allocated
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_layers, cfg.decoder_layers) == (
        *HF_SHAPES[size], HF_SHAPES[size][3])
    assert (cfg.kv_dim, cfg.vocab_size, cfg.tie_embeddings, cfg.rel_bias_shared) == (
        64, 32128, False, True)


@pytest.mark.parametrize("size", PUBLISHED)
def test_the_hf_config_maps_back_to_the_preset(size):
    from megarch.convert.hf_t5 import hf_config_from_model, model_config_from_hf

    cfg = get_model_preset(f"ed_t5_v1_1_{size}")
    assert model_config_from_hf(hf_config_from_model(cfg)) == cfg


@pytest.mark.parametrize("size", PUBLISHED)
def test_decoder_pairs_have_the_same_blocks_per_token(size):
    ed = get_model_preset(f"ed_t5_v1_1_{size}")
    for short in ("cd", "nd"):
        dec = get_model_preset(f"{short}_t5_v1_1_{size}")
        assert dec.arch == {"cd": "causal_decoder", "nd": "nonc_decoder"}[short]
        assert (dec.d_model, dec.n_heads, dec.d_ff, dec.n_layers) == (
            ed.d_model, ed.n_heads, ed.d_ff, ed.n_layers)
        # the study's lengths (PAPER.md): 512 + 114 tokens; the output layer aside (vocab 1),
        # an ED token costs a decoder token plus its share of cross-attention (q, o on decoder
        # tokens, k, v on encoder tokens: 2 d a per token next to 4 d a + 3 d f, <= 1/6 here)
        ed_flops = model_flops_per_token(dataclasses.replace(ed, vocab_size=1),
                                         encoder_len=512, decoder_len=114)
        dec_flops = model_flops_per_token(dataclasses.replace(dec, vocab_size=1), seq_len=626)
        d, a, f = ed.d_model, ed.n_heads * ed.kv_dim, ed.d_ff
        cross = 2 * d * a / (4 * d * a + 3 * d * f)
        assert 1.0 < ed_flops / dec_flops < 1.0 + cross, (ed_flops / dec_flops, cross)
    assert abs(config_parameter_count(get_model_preset("cd_t5_v1_1_xxl")) / 4.8e9 - 1) < 0.03


def _one_gpu_layout(preset: str) -> tuple[int, bool, float] | None:
    for checkpointing in (False, True):
        for micro in (8, 4, 2, 1):
            cfg = get_train_preset(preset)
            cfg.run.micro_batch, cfg.model.activation_checkpointing = micro, checkpointing
            total = estimate_config(cfg, 1, 1, 1, False)["total_GiB"]
            if total <= FIT_FRACTION * A100_GIB:
                return micro, checkpointing, total
    return None


@pytest.mark.parametrize("size", PUBLISHED)
def test_every_size_has_a_layout_on_1_and_8_a100s(size):
    for short in ("ed", "cd", "nd"):
        preset = f"{short}_t5_v1_1_{size}_mtf"
        cfg = get_train_preset(preset).validate()
        assert cfg.model == dataclasses.replace(get_model_preset(f"{short}_t5_v1_1_{size}"),
                                                dropout=0.1)
        recipe = choose_layout(preset)  # one node of 8 GPUs
        assert int(recipe["TP"]) * int(recipe["PP"]) <= 8
        one = _one_gpu_layout(preset)
        if preset == "ed_t5_v1_1_xxl_mtf":
            # fp32 master weights and gradients alone: 8 bytes x 11.14B = 83 GiB > 80 GiB
            assert one is None
            assert 8 * config_parameter_count(cfg.model) / 2**30 > A100_GIB
        else:
            assert one is not None, preset


def test_google_t5_v1_1_small_config_imports_as_the_preset():
    """google/t5-v1_1-small's config.json (as published on the Hub, recorded here): its import
    is the preset's model, so ``--preset ed_t5_v1_1_small_mtf --run.init_from`` fits it."""
    from megarch.convert.hf_t5 import model_config_from_hf

    hub = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64,
           "d_model": 512, "decoder_start_token_id": 0, "dropout_rate": 0.1,
           "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
           "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
           "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "output_past": True,
           "pad_token_id": 0, "relative_attention_num_buckets": 32,
           "tie_word_embeddings": False, "vocab_size": 32128}
    assert model_config_from_hf(hub) == get_train_preset("ed_t5_v1_1_small_mtf").model
