"""model.rel_bias_shared: one relative-bias table per stack (T5 as Hugging Face holds it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megarch.config.model import ModelConfig
from megarch.config.overrides import ConfigError
from megarch.config.presets import get_model_preset
from megarch.model import build_model, config_parameter_count, count_parameters


@pytest.mark.parametrize("arch", ["encoder_decoder", "causal_decoder"])
def test_shared_table_is_per_layer_tables_all_equal(arch):
    cfg = get_model_preset("ed_tiny" if arch == "encoder_decoder" else "cd_tiny")
    shared_cfg = dataclasses.replace(cfg, rel_bias_shared=True)
    torch.manual_seed(0)
    shared = build_model(shared_cfg).eval()
    state = shared.state_dict()
    tables = sorted(k for k in state if "rel_bias" in k)
    stacks = ["encoder_blocks", "decoder_blocks"] if arch == "encoder_decoder" else ["blocks"]
    assert tables == sorted(f"{s}.0.rel_bias.table" for s in stacks)
    assert count_parameters(shared) == config_parameter_count(shared_cfg)
    per_layer = build_model(cfg).eval()
    full = {}
    for name in per_layer.state_dict():
        source = name
        if "rel_bias" in name:
            stack = name.split(".")[0]
            source = f"{stack}.0.rel_bias.table"
        full[name] = state[source]
    per_layer.load_state_dict(full)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    fields = ({"encoder_tokens": tokens, "decoder_tokens": tokens[:, :5]}
              if arch == "encoder_decoder" else {"tokens": tokens})
    torch.testing.assert_close(shared(**fields), per_layer(**fields), rtol=0, atol=0)
    shared(**fields).sum().backward()  # every layer's use reaches the one table
    per_layer(**fields).sum().backward()
    for stack in stacks:
        summed = sum(getattr(per_layer, stack)[i].rel_bias.table.grad
                     for i in range(len(getattr(per_layer, stack))))
        torch.testing.assert_close(getattr(shared, stack)[0].rel_bias.table.grad, summed)


def test_shared_table_needs_t5_bias():
    with pytest.raises(ConfigError, match="rel_bias_shared"):
        ModelConfig(position="rotary", rel_bias_shared=True).validate()


def test_shared_table_is_refused_in_a_pipeline():
    from megarch.config.train import get_train_preset

    cfg = get_train_preset("ed_mlm_tiny")
    cfg.model.rel_bias_shared = True
    cfg.validate()  # tensor parallelism and one stage are fine
    cfg.parallel.pp = 2
    with pytest.raises(ConfigError, match="rel_bias_shared=true with parallel.pp=2"):
        cfg.parallel.validate_pipeline(cfg.model, cfg.run)
