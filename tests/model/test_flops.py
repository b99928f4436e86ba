"""FLOPs per token by hand and as counted on the real model; peaks and MFU."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megarch.config.model import ModelConfig
from megarch.model import build_model, mfu, model_flops_per_sample, model_flops_per_token
from megarch.model.flops import config_parameter_count, peak_flops

DEC = ModelConfig(arch="causal_decoder", vocab_size=10, d_model=8, n_heads=2, head_dim=4,
                  d_ff=16, n_layers=2)
ED = ModelConfig(arch="encoder_decoder", vocab_size=10, d_model=8, n_heads=2, head_dim=4,
                 d_ff=16, n_layers=2, n_decoder_layers=1)


def test_decoder_flops_by_hand():
    # per token: 2 * (2 layers * (4*8*8 + 3*8*16) + 8*10) = 2720; x 5 tokens = 13600;
    # attention: 2 layers * 4 * 8 * 5^2 = 1600. Forward 15200, training 3x = 45600.
    assert model_flops_per_sample(DEC, 5, training=False) == 15200
    assert model_flops_per_sample(DEC, 5) == 45600
    assert model_flops_per_token(DEC, 5) == 45600 / 5


def test_encoder_decoder_flops_by_hand():
    # encoder: 6 * 2 * 2 * 640 = 15360, attention 2 * 4 * 8 * 36 = 2304;
    # decoder: 3 * 2 * (768 + 80) = 5088, self-attention 4 * 8 * 9 = 288;
    # cross k, v on 6 encoder tokens: 6 * 2 * 2 * 64 = 1536; cross scores 4 * 8 * 3 * 6 = 576.
    forward = 15360 + 2304 + 5088 + 288 + 1536 + 576
    assert model_flops_per_sample(ED, encoder_len=6, decoder_len=3, training=False) == forward
    assert model_flops_per_token(ED, encoder_len=6, decoder_len=3) == 3 * forward / 9


@pytest.mark.parametrize("cfg,fields,kwargs", [
    (DEC, {"tokens": torch.randint(0, 10, (2, 5))}, {"seq_len": 5}),
    (ED, {"encoder_tokens": torch.randint(0, 10, (2, 6)),
          "decoder_tokens": torch.randint(0, 10, (2, 3))}, {"encoder_len": 6, "decoder_len": 3}),
])
def test_formula_equals_matmul_flops_counted_on_the_model(cfg, fields, kwargs):
    model = build_model(cfg)
    with FlopCounterMode(display=False) as counter:
        logits = model(**fields)
    assert counter.get_total_flops() == 2 * model_flops_per_sample(cfg, training=False, **kwargs)
    with FlopCounterMode(display=False) as counter:
        logits = model(**fields)
        logits.sum().backward()
    assert counter.get_total_flops() == 2 * model_flops_per_sample(cfg, **kwargs)
    assert config_parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_peaks_and_mfu():
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("anything", override=1e15) == 1e15
    with pytest.raises(ValueError, match="override"):
        peak_flops("Tesla V100")
    assert mfu(6e9, 1e4, 312e12, n_devices=2) == pytest.approx(6e13 / 624e12)
