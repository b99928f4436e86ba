"""megarch's rotary causal decoder -> Hugging Face Gemma: the one decoder-only export.

Gemma (v1) computes the same function as megarch's causal decoder with ``model.position
rotary``: pre-norm RMS layers without biases, GEGLU with tanh-approximated GELU
(``gelu_pytorch_tanh``), rotary embeddings on the two halves of each head (``rotate_half``,
the same pairing and frequencies), logits scaled by ``head_dim ** -0.5``. Three differences
are absorbed by rescaling weights, exactly up to one float32 rounding:

- Gemma's norms multiply by ``1 + weight``: the exported weight is megarch's minus one;
- Gemma multiplies the input embeddings by ``sqrt(d_model)``: the exported embedding is
  megarch's times ``d_model ** -0.5``;
- so a tied output layer reads that embedding, which is megarch's tied output (it scales the
  final hidden state by ``d_model ** -0.5``); an untied ``lm_head`` is copied as is.

The T5-bias decoders (the study's) and non-causal ones (prefix masks) have no HF twin and are
refused by :func:`check_gemma_exportable`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megarch.config.model import ModelConfig
from megarch.convert.hf_t5 import ConvertError


def check_gemma_exportable(cfg: ModelConfig) -> None:
    """Refuse a decoder-only model that Gemma does not compute exactly."""
    if cfg.arch != "causal_decoder" or cfg.position != "rotary":
        raise ConvertError(
            f"model.arch={cfg.arch} with model.position={cfg.position}: no Hugging Face "
            "architecture computes it exactly (decoders export only as causal_decoder with "
            "position rotary, to Gemma; T5 relative bias in every layer and prefix masks "
            "have no HF twin), so it is not exported")


def gemma_config(cfg: ModelConfig, pad_id: int, eos_id: int) -> dict:
    """The HF ``config.json`` of Gemma computing megarch model ``cfg``."""
    check_gemma_exportable(cfg)
    return {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.kv_dim, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
        "rms_norm_eps": cfg.norm_eps, "attention_bias": False, "attention_dropout": 0.0,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": pad_id,
        "eos_token_id": eos_id, "bos_token_id": pad_id, "dtype": "float32",
    }


def megarch_to_gemma(cfg: ModelConfig, state: dict[str, torch.Tensor]
                     ) -> list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]:
    """(HF name, shape, dtype, make) per Gemma tensor, rescaled as the module docstring says."""
    check_gemma_exportable(cfg)
    pairs = [("embed.weight", "model.embed_tokens.weight", "embed"),
             ("final_norm.weight", "model.norm.weight", "norm")]
    for i in range(cfg.n_layers):
        m, h = f"blocks.{i}", f"model.layers.{i}"
        pairs += [(f"{m}.attn.{p}.weight", f"{h}.self_attn.{p}_proj.weight", "") for p in "qkvo"]
        pairs += [(f"{m}.ff.wi_gate.weight", f"{h}.mlp.gate_proj.weight", ""),
                  (f"{m}.ff.wi_up.weight", f"{h}.mlp.up_proj.weight", ""),
                  (f"{m}.ff.wo.weight", f"{h}.mlp.down_proj.weight", ""),
                  (f"{m}.attn_norm.weight", f"{h}.input_layernorm.weight", "norm"),
                  (f"{m}.ff_norm.weight", f"{h}.post_attention_layernorm.weight", "norm")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", ""))
    scale = cfg.d_model ** -0.5
    entries = []
    for ours, theirs, how in sorted(pairs, key=lambda p: p[1]):
        if ours not in state:
            raise ConvertError(f"the checkpoint has no {ours!r}: not a model of its config")

        def make(ours: str = ours, how: str = how) -> torch.Tensor:
            tensor = state[ours].detach()
            if how == "norm":
                return (tensor.float() - 1.0).to(tensor.dtype)
            if how == "embed":
                return (tensor.float() * scale).to(tensor.dtype)
            return tensor

        entries.append((theirs, state[ours].shape, state[ours].dtype, make))
    return entries
