"""megarch's rotary causal decoder <-> Hugging Face Gemma: the one decoder-only bridge.

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

Grouped-query attention maps one to one: ``model.n_kv_heads`` is Gemma's
``num_key_value_heads``, and both read KV head ``h // (heads / kv_heads)`` for query head h, so
the k/v projections copy as they are.

The T5-bias decoders (the study's) and non-causal ones (prefix masks) have no HF twin and are
refused by :func:`check_gemma_exportable`. Importing (:func:`model_config_from_gemma`,
:func:`gemma_to_megarch`) undoes the three rescalings; Gemma configs megarch does not compute
(attention biases, another activation or rotary scaling) are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megarch.config.model import ModelConfig
from megarch.convert.hf_t5 import ConvertError, checked_model_config


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
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.kv_dim, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
        "rms_norm_eps": cfg.norm_eps, "attention_bias": False, "attention_dropout": 0.0,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": pad_id,
        "eos_token_id": eos_id, "bos_token_id": pad_id, "dtype": "float32",
    }


def _gemma_pairs(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(megarch name, Gemma name, rescaling: "embed", "norm" or "") of every parameter."""
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
    return pairs


def megarch_to_gemma(cfg: ModelConfig, state: dict[str, torch.Tensor]
                     ) -> list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]:
    """(HF name, shape, dtype, make) per Gemma tensor, rescaled as the module docstring says."""
    check_gemma_exportable(cfg)
    scale = cfg.d_model ** -0.5
    entries = []
    for ours, theirs, how in sorted(_gemma_pairs(cfg), key=lambda p: p[1]):
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


GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")
"""Gemma's feed-forward activations megarch computes (transformers reads the legacy "gelu" of
the official releases as the tanh approximation)."""


def model_config_from_gemma(hf: dict, where: str = "config.json") -> ModelConfig:
    """The megarch causal decoder (rotary) computing the Gemma (v1) of HF config ``hf``."""
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in GEMMA_ACTIVATIONS:
        raise ConvertError(f"{where}: hidden_activation={act!r} is not supported; supported: "
                           "'gelu_pytorch_tanh' (megarch's GEGLU)")
    if hf.get("attention_bias") or hf.get("use_bidirectional_attention"):
        raise ConvertError(f"{where}: attention_bias / use_bidirectional_attention true is not "
                           "supported; megarch's causal decoder has neither")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConvertError(f"{where}: rope scaling ({rope or hf.get('rope_scaling')}) is not "
                           "supported; only the default rotary embedding maps to megarch")

    def fields() -> dict:  # (a missing field raises KeyError: checked_model_config)
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        return dict(
            arch="causal_decoder", position="rotary", vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]), n_heads=heads,
            n_kv_heads=None if kv_heads == heads else kv_heads,
            head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
            d_ff=int(hf["intermediate_size"]), n_layers=int(hf["num_hidden_layers"]),
            rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=hf.get("tie_word_embeddings", True) is not False,
        )

    return checked_model_config(fields, where, "Gemma")


def gemma_to_megarch(cfg: ModelConfig, get: Callable[[str], torch.Tensor | None],
                     where: str) -> dict[str, torch.Tensor]:
    """The megarch state dict of ``cfg`` from Gemma tensors (``get(name)``: the tensor or
    None), float32, with the export's rescalings undone."""
    check_gemma_exportable(cfg)
    state = {}
    for ours, theirs, how in _gemma_pairs(cfg):
        tensor = get(theirs)
        if tensor is None and theirs == "lm_head.weight":
            raise ConvertError(f"{where}: tensor 'lm_head.weight' is missing but config.json "
                               "unties it (tie_word_embeddings false)")
        if tensor is None:
            raise ConvertError(f"{where}: tensor {theirs!r} is missing; the weights do not "
                               "match config.json (pass the directory save_pretrained wrote)")
        tensor = tensor.float()
        if how == "norm":
            tensor = tensor + 1.0
        elif how == "embed":
            tensor = tensor * cfg.d_model ** 0.5
        state[ours] = tensor
    return state
