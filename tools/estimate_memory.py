#!/usr/bin/env python3
"""Estimate per-GPU memory and step FLOPs of a training config under TP x PP x DP (± ZeRO-1).

    python tools/estimate_memory.py --preset cd_flm --tp 2 --dp 64
    python tools/estimate_memory.py --preset ed_mlm --tp 4 --dp 32 --zero1 --model.n_layers 12

What is counted, per rank (a first-order estimate, not a measurement):

- parameters: the tensor-parallel shard (vocab, heads, d_ff split by tp; norms replicated), the
  layers divided evenly over pp stages, the embedding on the first stage (and the last, tied);
- weights and gradients in float32 (the trainer keeps fp32 master weights; bf16 is autocast);
- optimizer state: AdamW 2 x 4 bytes per parameter, Adafactor its factored row/column second
  moments (~4 (rows + cols) bytes per matrix); divided by dp under ZeRO-1;
- activations per micro-batch of the stored forward: Korthikanti et al. (2022)'s per-layer
  ``s b h (10 + 24 / t + 5 a s / (h t))`` bytes for 16-bit activations without sequence
  parallelism (doubled for fp32), scaled by this model's widths; ``2 s b h`` per layer with
  activation checkpointing; 1F1B keeps up to pp micro-batches in flight on the first stage;
- the float32 logits of one micro-batch (vocab / tp wide) and their gradient.

FLOPs: megarch.model.flops (6 N per token + attention), per step and per rank.
"""

from __future__ import annotations

import argparse
import sys

from megarch.config.model import ModelConfig
from megarch.config.train import TRAIN_PRESETS, load_train_config
from megarch.model.flops import config_parameter_count, model_flops_per_token

GIB = 2**30


def replicated_parameters(cfg: ModelConfig) -> int:
    """Parameters every TP rank holds whole (the RMS norm weights)."""
    d = cfg.d_model
    count = cfg.n_layers * 2 * d + d
    if cfg.is_encoder_decoder:
        count += cfg.decoder_layers * 3 * d + d
    return count


def parameters_per_rank(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> int:
    """Parameters held by the most loaded rank (first pipeline stage) of a TP x PP layout."""
    total = config_parameter_count(cfg)
    replicated = replicated_parameters(cfg)
    embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    layers = total - replicated - embedding
    if pp == 1:
        return (layers + embedding) // tp + replicated
    return -(-layers // pp) // tp + embedding // tp + -(-replicated // pp)


def _optimizer_bytes(cfg: ModelConfig, name: str, params: int, tp: int) -> float:
    if name == "adamw":
        return 8.0 * params
    d, a, f = cfg.d_model, cfg.n_heads * cfg.kv_dim, cfg.d_ff
    layers = cfg.n_layers + (cfg.decoder_layers if cfg.is_encoder_decoder else 0)
    per_layer = 4 * (4 * (d + a // tp) + 3 * (d + f // tp))  # row + column moments
    return float(layers * per_layer + 4 * (cfg.vocab_size // tp + cfg.d_model))


def activation_bytes(cfg: ModelConfig, seq: int, micro: int, tp: int, fp32: bool,
                     checkpointing: bool) -> float:
    """Stored activations of one micro-batch through all layers of one rank (pp=1)."""
    h, heads = cfg.d_model, cfg.n_heads
    layers = cfg.n_layers + (cfg.decoder_layers if cfg.is_encoder_decoder else 0)
    if checkpointing:
        per_layer = 2.0 * seq * micro * h
    else:
        ffn_scale = cfg.d_ff / (4 * h) * 1.5  # GEGLU: two up projections of d_ff vs 4h
        per_layer = seq * micro * h * (10 + 24 * ffn_scale / tp + 5 * heads * seq / (h * tp))
    return per_layer * layers * (2.0 if fp32 else 1.0)


def estimate(overrides: list[str], preset: str, tp: int, pp: int, dp: int,
             zero1: bool) -> dict[str, float]:
    """Per-rank memory (GiB) and FLOPs of ``preset`` with dotted ``overrides``."""
    cfg = load_train_config(preset, None, overrides)
    model, run = cfg.model, cfg.run
    if model.vocab_size == 0:
        model.vocab_size = 32128
    seq = cfg.data.seq_len
    params = parameters_per_rank(model, tp, pp)
    optimizer = _optimizer_bytes(model, cfg.optim.name, params, tp) / (dp if zero1 else 1)
    fp32 = run.precision == "fp32"
    # 1F1B: a first stage stores n_layers / pp layers for up to pp micro-batches in flight
    acts = activation_bytes(model, seq, run.micro_batch, tp, fp32, model.activation_checkpointing)
    logits = 2 * 4.0 * run.micro_batch * seq * model.vocab_size / tp
    if model.is_encoder_decoder:
        flops_token = model_flops_per_token(model, encoder_len=seq, decoder_len=seq)
    else:
        flops_token = model_flops_per_token(model, seq_len=seq)
    tokens = run.global_batch * seq * (2 if model.is_encoder_decoder else 1)
    return {
        "parameters_per_rank_M": params / 1e6,
        "weights_GiB": 4.0 * params / GIB,
        "gradients_GiB": 4.0 * params / GIB,
        "optimizer_GiB": optimizer / GIB,
        "activations_GiB": acts / GIB,
        "logits_GiB": logits / GIB,
        "total_GiB": (8.0 * params + optimizer + acts + logits) / GIB,
        "step_PFLOP": flops_token * tokens / 1e15,
        "step_PFLOP_per_rank": flops_token * tokens / 1e15 / (tp * pp * dp),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the estimate; dotted ``--section.field VALUE`` overrides as megarch-train."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cd_flm", help=", ".join(TRAIN_PRESETS))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--zero1", action="store_true", help="shard optimizer state over dp")
    args, overrides = parser.parse_known_args(argv)
    result = estimate(overrides, args.preset, args.tp, args.pp, args.dp, args.zero1)
    print(f"{args.preset}: tp={args.tp} pp={args.pp} dp={args.dp} zero1={args.zero1}")
    for key, value in result.items():
        print(f"  {key:<22} {value:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
