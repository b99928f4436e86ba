#!/usr/bin/env python3
"""Estimate per-GPU memory and step FLOPs of a training config under TP x PP x DP (± ZeRO-1).

    python tools/estimate_memory.py --preset cd_flm --tp 2 --dp 64
    python tools/estimate_memory.py --preset ed_mlm --tp 4 --dp 32 --zero1 --model.n_layers 12
    python tools/estimate_memory.py --preset ed_mlm --tp 2 --pp 4 --virtual-stages 2 --dp 8
    python tools/estimate_memory.py --recipes          # the launch/recipes/ table (A100-80GB)
    python tools/estimate_memory.py --plan --preset ed_mlm --gpus 64 --gpu-mem 80 --bandwidth 25
    python tools/estimate_memory.py --plan --recipes   # the recipes' layouts ranked (launch/)

What is counted, for the pipeline rank with the largest total:

- parameters: the tensor-parallel shard (vocab, heads, d_ff split by tp; norms replicated) of
  the blocks the trainer gives the rank (megarch.model.pipeline_layout: the union
  of its model chunks; encoder blocks on the first ``encoder_stages`` virtual stages) and the
  embedding copies it holds (first stage, an encoder-decoder's first decoder stage, the last
  stage when tied);
- weights and gradients in float32 (the trainer keeps fp32 master weights; bf16 is autocast);
- optimizer state: AdamW 2 x 4 bytes per parameter, Adafactor its factored row/column second
  moments (~4 (rows + cols) bytes per matrix); divided by dp under ZeRO-1;
- activations: the bytes of the tensors megarch's model saves for the backward pass, counted
  op by op from its code (:func:`activation_bytes`) and checked against a measurement of the
  saved tensors of tiny models, every architecture at TP1 and TP2, with and without
  activation checkpointing, in float32 with the CPU attention and in bf16 autocast with the
  attention kernel, with and without dropout (tests/parallel/test_estimate_memory.py, within
  5%). Attention dropout costs nothing more with the kernel (it regenerates its mask from a
  seed); on the PyTorch attention its [batch, heads, len, len] mask is saved too.
  Pipelines: per virtual stage (:func:`chunk_activation_bytes`, checked so in float32), plus the
  chunk's output and (encoder-decoders' decoder stages) the encoder output that the schedule
  holds per micro-batch; the rank's forwards awaiting their backward are counted by walking the
  trainer's own order (1F1B, or interleaved 1F1B: Megatron's 2 (pp - 1) + (v - 1) pp + 1
  micro-batch chunks on the first rank), :func:`pipeline_rank_peak`;
- transients: the float32 logits' gradient, one block's recomputation under activation
  checkpointing, and (dp > 1) one bucket of the data-parallel all-reduce
  (``parallel.grad_bucket_mb``; larger gradients are reduced in place).

Not counted: the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation (the
recipes keep a margin for them, :data:`FIT_FRACTION`), rotary embeddings' extra tensors. The
norms are counted as their PyTorch path (NVIDIA apex's fused RMS norm, used when installed,
keeps 4 bytes per element less: an over-estimate then).

FLOPs: megarch.model.flops (6 N per token + attention), per step and per rank.

Step time (:func:`step_time`, ``--plan``): compute at a share of the peak, the 1F1B bubble,
the tensor- and pipeline-parallel transfers and the data-parallel reduction that the overlap
(megarch.parallel.grad_reduce) leaves exposed, at given bandwidths; :func:`plan_layouts`
ranks every layout that fits by it (a model of where time goes, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from megarch.config.model import ModelConfig
from megarch.config.train import (
    TRAIN_PRESETS,
    TrainConfig,
    load_train_config,
)
from megarch.model.flops import model_flops_per_token

GIB = 2**30
A100_GIB = 80.0
"""Memory of one A100-80GB (80 GiB)."""
FIT_FRACTION = 0.85
"""A recipe fits when the estimated total is at most this share of the GPU's memory: the rest
is for what the estimate leaves out (CUDA context, NCCL/cuBLAS workspaces, fragmentation)."""
RECIPE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "launch", "recipes")


def block_parameters(cfg: ModelConfig, kind: str, tp: int = 1) -> int:
    """Parameters of one block on one TP rank: ``self`` (decoder-only or encoder layer) or
    ``cross`` (encoder-decoder decoder layer); norms whole, the rest split over tp."""
    d, a, kv, f = cfg.d_model, cfg.n_heads * cfg.kv_dim, cfg.kv_heads * cfg.kv_dim, cfg.d_ff
    own_table = cfg.position == "t5_relative" and not cfg.rel_bias_shared
    bias = cfg.rel_buckets * cfg.n_heads if own_table else 0  # (shared: stage_parameters)
    attention = 2 * d * a + 2 * d * kv  # q, o; k, v (n_kv_heads)
    if kind == "self":
        return (attention + 3 * d * f + bias) // tp + 2 * d
    return (2 * attention + 3 * d * f + bias) // tp + 3 * d


def _layout(cfg: ModelConfig, pp: int, virtual_stages: int, encoder_stages: int):
    """The trainer's split of the blocks (megarch.model.pipeline_layout)."""
    from megarch.model import pipeline_layout

    return pipeline_layout(cfg, pp, virtual_stages, encoder_stages)


def _chunk_kind(cfg: ModelConfig, layout, virtual: int) -> str:
    return "cross" if cfg.is_encoder_decoder and not layout.is_encoder(virtual) else "self"


def stage_parameters(cfg: ModelConfig, tp: int = 1, pp: int = 1, virtual_stages: int = 1,
                     encoder_stages: int = 0) -> list[int]:
    """Parameters of each pipeline rank (the union of its model chunks) on one TP rank, as
    megarch.model.build_stage builds the stages: the same block split and embedding copies
    (the first stage, an encoder-decoder's first decoder stage, the last stage when tied)."""
    d, embedding = cfg.d_model, cfg.vocab_size * cfg.d_model // tp
    if pp == 1:
        count = cfg.n_layers * block_parameters(cfg, "self", tp) + d + 2 * embedding
        if cfg.is_encoder_decoder:
            count += cfg.decoder_layers * block_parameters(cfg, "cross", tp) + d
        if cfg.rel_bias_shared:  # one table per stack (no pipeline then)
            count += (cfg.rel_buckets * cfg.n_heads // tp) * (1 + cfg.is_encoder_decoder)
        return [count - (embedding if cfg.tie_embeddings else 0)]
    from megarch.model import embedding_ranks

    layout = _layout(cfg, pp, virtual_stages, encoder_stages)
    counts = [0] * pp
    for k, layers in enumerate(layout.layers):
        rank = layout.rank_of(k)
        counts[rank] += len(layers) * block_parameters(cfg, _chunk_kind(cfg, layout, k), tp)
        if cfg.is_encoder_decoder and k == layout.encoder_stages - 1:
            counts[rank] += d  # the encoder's final norm
    last = layout.rank_of(layout.n_virtual - 1)
    counts[last] += d + (0 if cfg.tie_embeddings else embedding)  # final norm, output layer
    for rank in embedding_ranks(layout, cfg):
        counts[rank] += embedding
    return counts


def parameters_per_rank(cfg: ModelConfig, tp: int = 1, pp: int = 1, virtual_stages: int = 1,
                        encoder_stages: int = 0) -> int:
    """Parameters held by the most loaded rank of a TP x PP layout (:func:`stage_parameters`)."""
    return max(stage_parameters(cfg, tp, pp, virtual_stages, encoder_stages))


def _optimizer_bytes(cfg: ModelConfig, name: str, params: int, tp: int,
                     layers: int | None = None, embedding: bool = True,
                     cross_layers: int | None = None) -> float:
    """AdamW's or Adafactor's state of a rank holding ``params`` parameters, ``layers``
    blocks (default all), ``cross_layers`` of them with cross-attention (an encoder-decoder's
    decoder blocks; default all of the model's) and (``embedding``) a copy of the embedding
    table. Adafactor keeps a row and a column moment per matrix and a full one per vector
    (the norms); with the defaults the count is the optimizer's to the byte."""
    if name == "adamw":
        return 8.0 * params
    d, a, kv, f = cfg.d_model, cfg.n_heads * cfg.kv_dim, cfg.kv_heads * cfg.kv_dim, cfg.d_ff
    whole = layers is None
    if whole:
        layers = cfg.n_layers + (cfg.decoder_layers if cfg.is_encoder_decoder else 0)
    if cross_layers is None:
        cross_layers = cfg.decoder_layers if cfg.is_encoder_decoder and whole else 0
    attention = 2 * (d + a // tp) + 2 * (d + kv // tp)  # q, o; k, v
    table = cfg.rel_buckets + cfg.n_heads // tp if cfg.position == "t5_relative" else 0
    per_block = attention + 3 * (d + f // tp) + 2 * d  # + the two norms' full moments
    floats = layers * per_block + cross_layers * (attention + d)  # cross-attention, its norm
    if cfg.rel_bias_shared:  # one table per stack (no pipeline then)
        floats += table * (2 if cfg.is_encoder_decoder else 1)
    else:
        floats += layers * table
    if whole:
        floats += d * (2 if cfg.is_encoder_decoder else 1)  # the final norms
    if embedding:  # the table; with the whole model untied, the output layer too
        copies = 2 if whole and not cfg.tie_embeddings else 1
        floats += copies * (cfg.vocab_size // tp + d)
    return 4.0 * floats


@dataclasses.dataclass
class Precision:
    """How the forward runs: ``bf16`` autocast or float32; ``flash`` the attention kernel
    (CUDA; attention dropout in place, no mask saved) or the PyTorch reference (CPU); ``cuda``
    whether dropout is CUDA's fused kernel (a 1-byte mask) rather than the CPU's (a mask of
    the input's dtype)."""

    bf16: bool
    flash: bool
    cuda: bool = True

    @property
    def act(self) -> int:
        """Bytes per element of a matmul output."""
        return 2 if self.bf16 else 4

    def mask(self, elem: int, split: bool) -> int:
        """Bytes per element of a dropout mask on an input of ``elem`` bytes; ``split``:
        activations split over TP ranks (megarch.parallel.rng draws a bool mask there)."""
        return 1 if self.cuda or split else elem


def _norm(tokens: float, d: int) -> float:
    """RMSNorm (PyTorch path): its float32 input and normalised output, and the 1 / rms."""
    return tokens * (8 * d + 4)


def _linear_inputs(tokens: float, d: int, consumers: int, p: Precision) -> float:
    """The input the projections after a norm save: one float32 tensor they share, or under
    autocast one bf16 cast per projection (autocast casts per call)."""
    return tokens * d * (2 * consumers if p.bf16 else 4)


def _attention_core(cfg: ModelConfig, b: int, q_len: int, k_len: int, tp: int, p: Precision,
                    bias: bool) -> float:
    """q, k, v and what the attention itself saves, and the o projection's input."""
    heads = cfg.n_heads // tp
    inner, kv_inner = heads * cfg.kv_dim, cfg.kv_heads // tp * cfg.kv_dim
    if p.flash:  # the kernel saves q, k, v (n_kv_heads), out (input dtype) and the fp32 lse
        core = p.act * (2 * inner * b * q_len + 2 * kv_inner * b * k_len)
        core += 4 * heads * b * q_len
    else:  # q, k, v (as autocast casts them for the matmuls; k, v repeated to every query
        # head, so of the full inner size under grouped-query attention); the fp32 softmax and
        # the probabilities the second matmul takes; bool mask; int64 bias buckets
        core = p.act * inner * (b * q_len + 2 * b * k_len)
        core += (4 + p.act) * heads * b * q_len * k_len
        core += b * q_len * k_len * (1 + (8 if bias else 0))
        if cfg.dropout > 0:  # the float32 probabilities' mask
            core += heads * b * q_len * k_len * p.mask(4, tp > 1)
    return core + p.act * inner * b * q_len  # merged heads: the o projection's input


def _feed_forward(cfg: ModelConfig, tokens: float, tp: int, p: Precision) -> float:
    """GEGLU: gate, gelu(gate), up, and their product (wo's input)."""
    hidden = cfg.d_ff // tp
    mask = p.mask(p.act, tp > 1) if cfg.dropout > 0 else 0
    return tokens * hidden * (4 * p.act + mask)


def layer_bytes(cfg: ModelConfig, kind: str, b: int, length: int, tp: int, sp: bool,
                p: Precision, enc_len: int = 0) -> float:
    """Saved bytes of one block of ``kind`` (``self``: decoder-only or encoder layer; ``cross``:
    the encoder-decoder's decoder layer) for ``b`` rows of ``length`` tokens."""
    d, tokens = cfg.d_model, b * length
    local = tokens / (tp if sp else 1)  # the residual stream's tokens on this rank
    bias = cfg.position == "t5_relative"
    out = 2 * _norm(local, d) + _linear_inputs(tokens, d, 3, p) + _linear_inputs(tokens, d, 2, p)
    out += _attention_core(cfg, b, length, length, tp, p, bias) + _feed_forward(cfg, tokens, tp, p)
    residual_mask = p.mask(p.act, sp) * local * d if cfg.dropout > 0 else 0.0
    out += 2 * residual_mask  # after attention and feed-forward
    if kind == "cross":
        out += _norm(local, d) + _linear_inputs(tokens, d, 1, p)
        out += _attention_core(cfg, b, length, enc_len, tp, p, bias=False)
        enc = b * enc_len
        if p.bf16:  # k and v each cast the encoder output
            out += _linear_inputs(enc, d, 2, p)
        elif sp:  # each layer gathers the encoder output's chunks
            out += _linear_inputs(enc, d, 1, p)
        out += residual_mask
    return out


def _weight_copy_bytes(cfg: ModelConfig, kind: str, tp: int) -> float:
    """bf16 copies of one block's matmul weights, saved by autocast's linears."""
    d, inner, f = cfg.d_model, cfg.n_heads * cfg.kv_dim // tp, cfg.d_ff // tp
    attention = 2 * d * inner + 2 * d * (cfg.kv_heads // tp * cfg.kv_dim)  # q, o; k, v
    matmul = attention + 3 * d * f + (attention if kind == "cross" else 0)
    return 2.0 * matmul


def _end_bytes(cfg: ModelConfig, part: str, b: int, enc_len: int, dec_len: int, div: int,
               sp: bool, p: Precision) -> float:
    """Saved bytes of one end of the model: ``encoder_embedding`` and ``embedding`` (the
    int64 token ids of the lookup and, with dropout, the mask after it), ``encoder_norm`` (the
    encoder's final norm) or ``output`` (the final norm and the logits' scaled input)."""
    d = cfg.d_model
    encoder = part in ("encoder_embedding", "encoder_norm")
    if encoder and not cfg.is_encoder_decoder:
        return 0.0
    tokens = b * (enc_len if encoder else dec_len)
    mask = p.mask(4, sp) * d * tokens / div if cfg.dropout > 0 else 0.0  # float32 input
    if part in ("encoder_embedding", "embedding"):
        return 8.0 * tokens + mask
    if part == "encoder_norm":
        return _norm(tokens / div, d) + mask
    return _norm(tokens / div, d) + 4.0 * d * tokens + mask


def activation_bytes(cfg: ModelConfig, enc_len: int, dec_len: int, micro: int, tp: int = 1,
                     sp: bool = False, bf16: bool = False, flash: bool = False,
                     cuda: bool = True) -> dict[str, float]:
    """Bytes one micro-batch keeps for the backward pass of the whole model on one TP rank,
    by part (pipeline stages: :func:`chunk_activation_bytes`).

    ``dec_len`` is the decoder-only model's row length; ``enc_len`` (encoder-decoder) the
    encoder's. With ``model.activation_checkpointing`` each block keeps only its input (plus,
    once, the encoder output), and ``recompute`` is one block's activations, rebuilt in the
    backward.
    Parts: ``blocks``, ``weight_copies`` (bf16 weights under autocast), ``ends``, ``logits``
    (the float32 copies the loss keeps: :func:`loss_logit_bytes`), ``recompute``. ``cuda``:
    dropout masks as CUDA stores them (1 byte; see :class:`Precision`).
    """
    p = Precision(bf16, flash, cuda)
    d, b, sp = cfg.d_model, micro, sp and tp > 1
    div = tp if sp else 1
    if cfg.is_encoder_decoder:
        stacks = [("self", cfg.n_layers, enc_len), ("cross", cfg.decoder_layers, dec_len)]
    else:
        stacks = [("self", cfg.n_layers, dec_len)]
    blocks = copies = recompute = 0.0
    for kind, n, length in stacks:
        full = layer_bytes(cfg, kind, b, length, tp, sp, p, enc_len)
        recompute = max(recompute, full + (_weight_copy_bytes(cfg, kind, tp) if bf16 else 0))
        if cfg.activation_checkpointing:
            blocks += n * 4 * d * b * length / div  # the fp32 residual input of each block
        else:
            blocks += n * full
            copies += n * _weight_copy_bytes(cfg, kind, tp) if bf16 else 0.0
    if cfg.is_encoder_decoder and (cfg.activation_checkpointing or not (bf16 or sp)):
        blocks += 4 * d * b * enc_len / (div if cfg.activation_checkpointing else 1)
    ends_bytes = sum(_end_bytes(cfg, part, b, enc_len, dec_len, div, sp, p)
                     for part in ("encoder_embedding", "embedding", "encoder_norm", "output"))
    return {"blocks": blocks, "weight_copies": copies, "ends": ends_bytes,
            "logits": loss_logit_bytes(cfg, b, dec_len, tp),
            "recompute": recompute if cfg.activation_checkpointing else 0.0}


def logit_bytes(cfg: ModelConfig, micro: int, dec_len: int, tp: int) -> float:
    """One float32 copy of a micro-batch's logits (this rank's vocab shard): also the size of
    their gradient, the backward's transient."""
    return 4.0 * micro * dec_len * cfg.vocab_size / tp


def loss_logit_bytes(cfg: ModelConfig, micro: int, dec_len: int, tp: int) -> float:
    """The float32 logit copies ``lm_loss`` keeps for its backward: one (the logsumexp's input;
    the cross-entropy reuses its log-normaliser), two under TP (the vocab-parallel version
    also keeps the exponentials)."""
    return (1 if tp == 1 else 2) * logit_bytes(cfg, micro, dec_len, tp)


def chunk_activation_bytes(cfg: ModelConfig, layout, virtual: int, enc_len: int, dec_len: int,
                           micro: int, tp: int = 1, bf16: bool = False, flash: bool = False,
                           cuda: bool = True) -> dict[str, float]:
    """Bytes one micro-batch keeps, until its backward, in virtual stage ``virtual`` of a
    pipeline ``layout`` (megarch.model.PipelineLayout), by part as
    :func:`activation_bytes` (no sequence parallelism: stages refuse it), plus ``carried``:
    what the schedule holds for the backward beyond the saved tensors: the chunk's output
    (float32 [micro, len, d_model], all but the last virtual stage) and, on an
    encoder-decoder's decoder stages, the encoder output it received (float32
    [micro, enc_len, d_model]; its gradient goes back summed over the decoder stages)."""
    p = Precision(bf16, flash, cuda)
    d, b, n = cfg.d_model, micro, len(layout.layers[virtual])
    kind = _chunk_kind(cfg, layout, virtual)
    encoder = cfg.is_encoder_decoder and layout.is_encoder(virtual)
    length = enc_len if encoder else dec_len
    full = layer_bytes(cfg, kind, b, length, tp, False, p, enc_len)
    copy = _weight_copy_bytes(cfg, kind, tp) if bf16 else 0.0
    ckpt = cfg.activation_checkpointing
    parts = {"blocks": n * (4.0 * d * b * length if ckpt else full),
             "weight_copies": 0.0 if ckpt else n * copy, "ends": 0.0, "logits": 0.0,
             "recompute": full + copy if ckpt else 0.0, "carried": 0.0}
    ends = []
    if virtual == 0:
        ends.append("encoder_embedding" if cfg.is_encoder_decoder else "embedding")
    if cfg.is_encoder_decoder and virtual == layout.encoder_stages:
        ends.append("embedding")  # the first decoder stage embeds the decoder tokens
    if cfg.is_encoder_decoder and virtual == layout.encoder_stages - 1:
        ends.append("encoder_norm")
    last = virtual == layout.n_virtual - 1
    if last:
        ends.append("output")
        parts["logits"] = loss_logit_bytes(cfg, b, dec_len, tp)
    parts["ends"] = sum(_end_bytes(cfg, e, b, enc_len, dec_len, 1, False, p) for e in ends)
    if not last:
        parts["carried"] += 4.0 * d * b * length
    if cfg.is_encoder_decoder and not encoder:
        parts["carried"] += 4.0 * d * b * enc_len
    return parts


def pipeline_rank_peak(layout, rank: int, n_micro: int, stored: list[float],
                       transient: list[float]) -> tuple[float, float, float, int]:
    """Peak activation bytes of pipeline ``rank`` under the trainer's schedule (1F1B, or
    interleaved 1F1B with virtual stages, megarch.parallel.pipeline_schedules): the sum of
    ``stored[k]`` over its forwards in virtual stage k awaiting their backward, plus
    ``transient[k]`` while the backward of one runs. Returns (peak, stored then, transient
    then, most micro-batch forwards in flight)."""
    from megarch.parallel.pipeline_schedules import interleaved_order, one_f_one_b_order

    if layout.virtual_stages > 1:
        order = interleaved_order(layout.pp, layout.virtual_stages, rank, n_micro)
    else:
        order = one_f_one_b_order(layout.pp, rank, n_micro)
    alive, live, most = 0.0, 0, 0
    peak = (0.0, 0.0, 0.0)
    for op in order:
        k = layout.virtual(rank, op.chunk)
        if op.backward:
            peak = max(peak, (alive + transient[k], alive, transient[k]))
            alive, live = alive - stored[k], live - 1
        else:
            alive, live = alive + stored[k], live + 1
            peak, most = max(peak, (alive, alive, 0.0)), max(most, live)
    return (*peak, most)


def sequence_lengths(cfg: TrainConfig) -> tuple[int, int]:
    """(encoder length, decoder length) of the config's samples (encoder 0 for decoders)."""
    data = cfg.data
    if data.objective == "multitask":
        if cfg.model.is_encoder_decoder:
            return data.inputs_len, data.targets_len
        return 0, data.inputs_len + data.targets_len
    if not cfg.model.is_encoder_decoder:
        return 0, data.seq_len
    if data.objective == "mlm":
        from megarch.data.span_corruption import corrupted_lengths, raw_length_for

        raw = raw_length_for(data.seq_len, noise_density=data.noise_density,
                             mean_span=data.mean_noise_span)
        return corrupted_lengths(raw, data.noise_density, data.mean_noise_span)
    return data.seq_len, data.seq_len


def estimate_config(cfg: TrainConfig, tp: int, pp: int, dp: int, zero1: bool,
                    sp: bool = False, virtual_stages: int = 1,
                    encoder_stages: int = 0) -> dict[str, float]:
    """Per-rank memory (GiB) and FLOPs of ``cfg`` on CUDA (the attention kernel; bf16 autocast
    when ``run.precision`` is bf16) under a TP x PP x DP layout, for the pipeline rank with
    the largest total. ``virtual_stages`` and ``encoder_stages`` are the
    ``parallel.virtual_stages`` / ``parallel.encoder_stages`` of the pipeline (pp > 1)."""
    model, run = cfg.model, cfg.run
    if model.vocab_size == 0:
        model.vocab_size = 32128
    enc_len, dec_len = sequence_lengths(cfg)
    bf16 = run.precision == "bf16"
    # per rank: (parameters, blocks, holds an embedding, peak activations, stored, transient,
    # micro-batches in flight)
    ranks: list[tuple] = []
    if pp == 1:
        acts = activation_bytes(model, enc_len, dec_len, run.micro_batch, tp, sp, bf16, True)
        stored = acts["blocks"] + acts["weight_copies"] + acts["ends"] + acts["logits"]
        backward = acts["recompute"] + logit_bytes(model, run.micro_batch, dec_len, tp)
        ranks.append((stage_parameters(model, tp)[0], None, True, stored + backward, stored,
                      backward, 1))
    else:
        if sp:
            raise ValueError("--sp with pp > 1: the pipeline stages do not support sequence "
                             "parallelism; drop --sp or use pp 1")
        from megarch.model import embedding_ranks

        layout = _layout(model, pp, virtual_stages, encoder_stages)
        counts = stage_parameters(model, tp, pp, virtual_stages, encoder_stages)
        chunks = [chunk_activation_bytes(model, layout, k, enc_len, dec_len, run.micro_batch,
                                         tp, bf16, True) for k in range(layout.n_virtual)]
        stored = [c["blocks"] + c["weight_copies"] + c["ends"] + c["logits"] + c["carried"]
                  for c in chunks]
        grad = logit_bytes(model, run.micro_batch, dec_len, tp)  # the logits' fp32 gradient
        transient = [c["recompute"] + (grad if c["logits"] else 0.0) for c in chunks]
        n_micro = max(1, run.global_batch // (run.micro_batch * dp))
        tables = set(embedding_ranks(layout, model))
        tables.add(layout.rank_of(layout.n_virtual - 1))  # the output layer
        for r in range(pp):
            chunks_r = [layout.virtual(r, c) for c in range(virtual_stages)]
            blocks = sum(len(layout.layers[k]) for k in chunks_r)
            cross = sum(len(layout.layers[k]) for k in chunks_r
                        if _chunk_kind(model, layout, k) == "cross")
            ranks.append((counts[r], (blocks, cross), r in tables,
                          *pipeline_rank_peak(layout, r, n_micro, stored, transient)))
    rows = []
    for r, (params, blocks, table, peak, stored, backward, live) in enumerate(ranks):
        layers, cross = blocks if blocks is not None else (None, None)
        optimizer = _optimizer_bytes(model, cfg.optim.name, params, tp, layers, table, cross)
        optimizer /= dp if zero1 else 1
        # the all-reduce's one bucket, after the backward (larger gradients go in place)
        allreduce = min(cfg.parallel.grad_bucket_mb * 2**20, 4.0 * params) if dp > 1 else 0.0
        total = 8.0 * params + optimizer + max(peak, allreduce)
        rows.append((total, r, params, optimizer, stored, backward, allreduce, live))
    total, rank, params, optimizer, stored, backward, allreduce, live = max(rows)
    if model.is_encoder_decoder:
        flops_token = model_flops_per_token(model, encoder_len=enc_len, decoder_len=dec_len)
    else:
        flops_token = model_flops_per_token(model, seq_len=dec_len)
    tokens = run.global_batch * (enc_len + dec_len)
    return {
        "pipeline_rank": rank,
        "micro_batches_in_flight": live,
        "parameters_per_rank_M": params / 1e6,
        "weights_GiB": 4.0 * params / GIB,
        "gradients_GiB": 4.0 * params / GIB,
        "optimizer_GiB": optimizer / GIB,
        "activations_GiB": stored / GIB,
        "backward_transient_GiB": backward / GIB,
        "allreduce_GiB": allreduce / GIB,
        "total_GiB": total / GIB,
        "step_PFLOP": flops_token * tokens / 1e15,
        "step_PFLOP_per_rank": flops_token * tokens / 1e15 / (tp * pp * dp),
    }


def estimate(overrides: list[str], preset: str, tp: int, pp: int, dp: int,
             zero1: bool, sp: bool = False, virtual_stages: int = 1,
             encoder_stages: int = 0) -> dict[str, float]:
    """Per-rank memory (GiB) and FLOPs of ``preset`` with dotted ``overrides``."""
    return estimate_config(load_train_config(preset, None, overrides), tp, pp, dp, zero1, sp,
                           virtual_stages, encoder_stages)


RECIPE_KEYS = ("PRESET", "GPUS_PER_NODE", "TP", "PP", "MICRO_BATCH", "ACTIVATION_CHECKPOINTING",
               "ZERO1")
"""The variables a launch/recipes/*.env file sets (launch/common.sh reads the same)."""
GPUS_PER_NODE = 8


def read_recipe(name_or_path: str) -> dict[str, str]:
    """The KEY=VALUE lines of a recipe (``cd_flm`` or a path to an ``.env`` file)."""
    path = name_or_path if name_or_path.endswith(".env") else os.path.join(
        RECIPE_DIR, f"{name_or_path}.env")
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, eq, value = line.partition("=")
            if not eq or key not in RECIPE_KEYS:
                raise ValueError(f"{path}:{number}: expected KEY=VALUE with KEY one of "
                                 f"{', '.join(RECIPE_KEYS)}, got {line!r}")
            values[key] = value
    missing = set(RECIPE_KEYS) - set(values)
    if missing:
        raise ValueError(f"{path}: missing {', '.join(sorted(missing))}")
    return values


def recipe_overrides(recipe: dict[str, str]) -> list[str]:
    """The megarch-train overrides a recipe adds (launch/common.sh passes the same)."""
    return ["--run.micro_batch", recipe["MICRO_BATCH"],
            "--model.activation_checkpointing", recipe["ACTIVATION_CHECKPOINTING"],
            "--parallel.zero1", recipe["ZERO1"]]


def recipe_dp(recipe: dict[str, str], nodes: int) -> int:
    """The data-parallel size of a recipe on ``nodes`` nodes."""
    return nodes * int(recipe["GPUS_PER_NODE"]) // (int(recipe["TP"]) * int(recipe["PP"]))


def recipe_estimate(recipe: dict[str, str], dp: int) -> dict[str, float]:
    """The estimate of a recipe at data-parallel size ``dp`` (ZeRO-1 over it when on)."""
    tp, pp = int(recipe["TP"]), int(recipe["PP"])
    cfg = load_train_config(recipe["PRESET"], None, recipe_overrides(recipe))
    return estimate_config(cfg, tp, pp, dp, recipe["ZERO1"] == "true")


def choose_layout(preset: str) -> dict[str, str]:
    """The recipe for ``preset`` on 8-GPU A100-80GB nodes: the first layout, in order of
    expected throughput, whose estimate fits :data:`FIT_FRACTION` of 80 GiB at any node count
    (the larger estimate of dp = 1, where ZeRO-1 saves nothing, and dp = 2, which adds the
    all-reduce's gradient copy).

    Order: no activation checkpointing (it recomputes the forward: ~1/3 more compute), then
    pp = 1 (no pipeline bubble), then a micro-batch of at least 4 rows (fuller matmuls), then
    the smallest tp within the node (less communication per layer), then the largest
    micro-batch. ZeRO-1 is always on: free memory for one reduce of the state.
    """
    limit = FIT_FRACTION * A100_GIB
    for ckpt in ("false", "true"):
        for pp in (1, 2, 4):
            for least in (4, 1):
                for tp in (1, 2, 4, 8):
                    for micro in (8, 4, 2, 1):
                        if micro < least:
                            continue
                        recipe = {"PRESET": preset, "GPUS_PER_NODE": str(GPUS_PER_NODE),
                                  "TP": str(tp), "PP": str(pp), "MICRO_BATCH": str(micro),
                                  "ACTIVATION_CHECKPOINTING": ckpt, "ZERO1": "true"}
                        if tp * pp <= GPUS_PER_NODE and max(
                                recipe_estimate(recipe, dp)["total_GiB"] for dp in (1, 2)
                        ) <= limit:
                            return recipe
    raise ValueError(f"{preset}: no layout fits {limit:.0f} GiB per GPU")


def recipe_text(recipe: dict[str, str]) -> str:
    """The ``.env`` file of a recipe."""
    head = (f"# {recipe['PRESET']} on NNODES x 8 A100-80GB (the study's full scale). Written by\n"
            "# tools/estimate_memory.py --write-recipes (the rule: choose_layout); launch with\n"
            f"#   RECIPE={recipe['PRESET']} NNODES=N launch/torchrun_multi_node.sh\n")
    return head + "".join(f"{key}={recipe[key]}\n" for key in RECIPE_KEYS)


def write_recipes(directory: str = RECIPE_DIR) -> list[str]:
    """Write one recipe per study pair (atomically: a temp file renamed); the paths."""
    from megarch.config.train import STUDY_PAIRS

    os.makedirs(directory, exist_ok=True)
    paths = []
    for preset, _, _ in STUDY_PAIRS:
        path = os.path.join(directory, f"{preset}.env")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(recipe_text(choose_layout(preset)))
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def recipe_table(nodes: int = 8) -> str:
    """A markdown table of the recipes in launch/recipes/ on ``nodes`` nodes."""
    from megarch.config.train import STUDY_PAIRS

    rows = ["| recipe | TP x PP x DP | micro-batch | act. ckpt | ZeRO-1 | GiB / GPU "
            "| PFLOP / step |", "|---|---|---|---|---|---|---|"]
    for preset, _, _ in STUDY_PAIRS:
        recipe = read_recipe(preset)
        tp, pp, dp = int(recipe["TP"]), int(recipe["PP"]), recipe_dp(recipe, nodes)
        est = recipe_estimate(recipe, dp)
        rows.append(f"| {preset} | {tp} x {pp} x {dp} | {recipe['MICRO_BATCH']} | "
                    f"{recipe['ACTIVATION_CHECKPOINTING']} | {recipe['ZERO1']} | "
                    f"{est['total_GiB']:.1f} | {est['step_PFLOP']:.0f} |")
    return "\n".join(rows)


# --- modelled step time and the layout planner (--plan) ---

@dataclasses.dataclass
class Hardware:
    """What the step-time model assumes of the cluster (A100-80GB nodes by default)."""

    peak_tflops: float = 312.0
    """Dense bf16 peak of one GPU (A100: 312 TFLOP/s)."""
    efficiency: float = 0.5
    """Share of the peak the model's compute reaches (MFU without communication)."""
    dp_gbps: float = 25.0
    """Data-parallel bandwidth per GPU, GB/s (the network between nodes: ~25 on the paper's
    cluster)."""
    tp_gbps: float = 150.0
    """Tensor- and pipeline-parallel bandwidth per GPU inside a node (NVLink), GB/s."""
    saturation_tokens: float = 512.0
    """Smaller micro-batches fill the matmuls less: the compute runs at ``efficiency`` x
    T / (T + saturation_tokens) for T tokens per micro-batch (an assumption: 0 turns it off)."""
    gpus_per_node: int = GPUS_PER_NODE


def step_time(cfg: TrainConfig, tp: int, pp: int, dp: int, zero1: bool,
              virtual_stages: int = 1, hw: Hardware | None = None,
              est: dict | None = None, overlap: bool = True) -> dict[str, float]:
    """Modelled seconds of one optimizer step of ``cfg`` under a layout, and its parts.

    - compute: the step's model FLOPs (``est['step_PFLOP_per_rank']``), x 4/3 with activation
      checkpointing (the forward again), at ``efficiency`` x T / (T + saturation_tokens) of
      the peak, T the tokens of a micro-batch (encoder + decoder);
    - bubble: 1F1B's idle share (pp - 1) / (v m) of the compute, m = global / (micro x dp)
      micro-batches per step;
    - tp: the tensor-parallel all-reduces of [micro, len, d_model] bf16 activations, two per
      self-attention block and three per cross-attention block forward, as many backward, and
      the forward's again under checkpointing; a ring moves 2 (tp - 1) / tp of the bytes;
      not overlapped (megarch issues them in the layer's critical path);
    - pp: the float32 hidden states [micro, len, d_model] each chunk sends forward and receives
      backward, per micro-batch and model chunk;
    - dp: the float32 gradients of the rank's parameters: an all-reduce moves 2 (dp - 1) / dp of
      them; ZeRO-1 a reduce of (dp - 1) / dp and the parameters' broadcast after the update,
      (dp - 1) / dp (1.0x an all-reduce). ``overlap`` (parallel.overlap_grad_reduce): the
      gradient reduction hides behind the last micro-batch's backward (2/3 of its compute, 3/4
      with checkpointing) except the last bucket (``parallel.grad_bucket_mb``); the ZeRO-1
      broadcast after the optimizer step is exposed. Without ``overlap`` all of it is exposed.

    The step time is compute + bubble + tp + pp + the exposed dp time.
    """
    hw = hw or Hardware()
    model, run = cfg.model, cfg.run
    est = est or estimate_config(cfg, tp, pp, dp, zero1, virtual_stages=virtual_stages)
    enc_len, dec_len = sequence_lengths(cfg)
    ckpt = model.activation_checkpointing
    m = max(1, run.global_batch // (run.micro_batch * dp))
    micro_tokens = run.micro_batch * (enc_len + dec_len)
    fill = micro_tokens / (micro_tokens + hw.saturation_tokens)
    compute = est["step_PFLOP_per_rank"] * 1e15 * (4 / 3 if ckpt else 1.0) / (
        hw.peak_tflops * 1e12 * hw.efficiency * fill)
    bubble = compute * (pp - 1) / (virtual_stages * m)
    d = model.d_model
    if model.is_encoder_decoder:
        reductions = 2 * model.n_layers * run.micro_batch * enc_len * d \
            + 3 * model.decoder_layers * run.micro_batch * dec_len * d
    else:
        reductions = 2 * model.n_layers * run.micro_batch * dec_len * d
    passes = 3 if ckpt else 2  # forward, backward (and the recomputed forward)
    tp_bytes = 0.0 if tp == 1 else passes * m * reductions / pp * 2.0 * 2 * (tp - 1) / tp
    tp_s = tp_bytes / (hw.tp_gbps * 1e9)
    hidden = micro_tokens * d * 4.0
    pp_s = 0.0 if pp == 1 else 2 * m * virtual_stages * hidden / (hw.tp_gbps * 1e9)
    grads = 4.0 * est["parameters_per_rank_M"] * 1e6
    share = (dp - 1) / dp
    reduce_s = (share if zero1 else 2 * share) * grads / (hw.dp_gbps * 1e9)
    gather_s = share * grads / (hw.dp_gbps * 1e9) if zero1 else 0.0
    if overlap and dp > 1:
        window = (compute / m) * (0.75 if ckpt else 2 / 3)
        bucket = min(cfg.parallel.grad_bucket_mb * 2**20, grads)
        tail = (share if zero1 else 2 * share) * bucket / (hw.dp_gbps * 1e9)
        dp_exposed = max(reduce_s - window, tail) + gather_s
    else:
        dp_exposed = reduce_s + gather_s
    total = compute + bubble + tp_s + pp_s + dp_exposed
    tokens = run.global_batch * (enc_len + dec_len)
    return {"compute_s": compute, "bubble_s": bubble, "tp_s": tp_s, "pp_s": pp_s,
            "dp_s": reduce_s + gather_s, "dp_exposed_s": dp_exposed, "step_s": total,
            "tokens_per_s": tokens / total, "micro_batches": m}


def plan_layouts(cfg: TrainConfig, gpus: int, gpu_gib: float, hw: Hardware | None = None,
                 micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> list[dict]:
    """Every layout of ``gpus`` GPUs (TP and PP inside a node, virtual stages 1 or 2, DP the
    rest, the micro-batch, activation checkpointing, ZeRO-1) that the trainer accepts and whose
    estimate fits :data:`FIT_FRACTION` of ``gpu_gib``, fastest modelled step first."""
    from megarch.config.overrides import ConfigError

    hw = hw or Hardware()
    rows = []
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= hw.gpus_per_node]
    for tp in sizes:
        for pp in sizes:
            if tp * pp > hw.gpus_per_node or gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for virtual in ((1, 2) if pp > 1 else (1,)):
                for micro in micro_batches:
                    if cfg.run.global_batch % (micro * dp):
                        continue
                    for ckpt in (False, True):
                        trial = dataclasses.replace(
                            cfg, model=dataclasses.replace(cfg.model,
                                                           activation_checkpointing=ckpt),
                            run=dataclasses.replace(cfg.run, micro_batch=micro),
                            parallel=dataclasses.replace(cfg.parallel, tp=tp, pp=pp, dp=dp,
                                                         virtual_stages=virtual))
                        try:
                            trial.parallel.validate_pipeline(trial.model, trial.run)
                            fits = {z: estimate_config(trial, tp, pp, dp, z,
                                                       virtual_stages=virtual)
                                    for z in ((False, True) if dp > 1 else (False,))}
                        except (ConfigError, ValueError):  # a split the trainer refuses
                            continue
                        for zero, est in fits.items():
                            if est["total_GiB"] > FIT_FRACTION * gpu_gib:
                                continue
                            time_ = step_time(trial, tp, pp, dp, zero, virtual, hw, est)
                            rows.append({"tp": tp, "pp": pp, "virtual_stages": virtual,
                                         "dp": dp, "micro_batch": micro,
                                         "activation_checkpointing": ckpt, "zero1": zero,
                                         "total_GiB": est["total_GiB"], **time_})
    rows.sort(key=lambda r: (r["step_s"], r["total_GiB"]))
    return rows


def plan_table(rows: list[dict], top: int = 10) -> str:
    """A markdown table of the first ``top`` planned layouts."""
    lines = ["| rank | TP x PP (v) x DP | micro | act. ckpt | ZeRO-1 | GiB / GPU | step s "
             "| compute | bubble | TP | PP | DP exposed / total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows[:top], 1):
        lines.append(
            f"| {i} | {r['tp']} x {r['pp']} ({r['virtual_stages']}) x {r['dp']} | "
            f"{r['micro_batch']} | {str(r['activation_checkpointing']).lower()} | "
            f"{str(r['zero1']).lower()} | {r['total_GiB']:.1f} | {r['step_s']:.2f} | "
            f"{r['compute_s']:.2f} | {r['bubble_s']:.2f} | {r['tp_s']:.2f} | {r['pp_s']:.3f} | "
            f"{r['dp_exposed_s']:.2f} / {r['dp_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the estimate, or the recipes' table; dotted ``--section.field VALUE`` overrides as
    megarch-train."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cd_flm", help=", ".join(TRAIN_PRESETS))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--zero1", action="store_true", help="shard optimizer state over dp")
    parser.add_argument("--sp", action="store_true", help="sequence parallelism (tp > 1)")
    parser.add_argument("--virtual-stages", type=int, default=1,
                        help="model chunks per pipeline rank (interleaved 1F1B; pp > 1)")
    parser.add_argument("--encoder-stages", type=int, default=0,
                        help="encoder-decoder pipelines: virtual stages of encoder blocks "
                             "(0: automatic)")
    parser.add_argument("--recipes", action="store_true",
                        help="print the table of launch/recipes/*.env (A100-80GB nodes)")
    parser.add_argument("--nodes", type=int, default=8, help="--recipes: nodes of 8 GPUs")
    parser.add_argument("--write-recipes", action="store_true",
                        help="choose and write launch/recipes/<pair>.env (choose_layout)")
    parser.add_argument("--plan", action="store_true",
                        help="rank the layouts that fit --gpus GPUs of --gpu-mem GiB by "
                             "modelled step time")
    parser.add_argument("--gpus", type=int, default=64, help="--plan: GPUs in the job")
    parser.add_argument("--gpu-mem", type=float, default=A100_GIB,
                        help="--plan: GiB of memory per GPU")
    parser.add_argument("--bandwidth", type=float, default=Hardware.dp_gbps,
                        help="--plan: data-parallel GB/s per GPU (between nodes)")
    parser.add_argument("--tp-bandwidth", type=float, default=Hardware.tp_gbps,
                        help="--plan: GB/s per GPU inside a node (TP, PP)")
    parser.add_argument("--peak-tflops", type=float, default=Hardware.peak_tflops)
    parser.add_argument("--efficiency", type=float, default=Hardware.efficiency,
                        help="--plan: share of the peak the compute reaches")
    parser.add_argument("--saturation-tokens", type=float, default=Hardware.saturation_tokens,
                        help="--plan: micro-batch tokens at which the compute runs at half "
                             "the efficiency (0: no micro-batch effect)")
    parser.add_argument("--top", type=int, default=10, help="--plan: rows printed")
    args, overrides = parser.parse_known_args(argv)
    for name in ("tp", "pp", "dp", "virtual_stages", "nodes", "encoder_stages"):
        low = 0 if name == "encoder_stages" else 1
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= {low}")
    if args.plan and args.recipes:
        hw = Hardware(args.peak_tflops, args.efficiency, args.bandwidth, args.tp_bandwidth,
                      args.saturation_tokens)
        print(f"{args.nodes} nodes x {GPUS_PER_NODE} A100-80GB; modelled with "
              f"{hw.peak_tflops:g} TFLOP/s x {hw.efficiency:g}, DP {hw.dp_gbps:g} GB/s, "
              f"TP/PP {hw.tp_gbps:g} GB/s")
        print(recipe_plan_table(args.nodes, hw, min(args.top, 3)))
        return 0
    if args.plan:
        return _plan(parser, args, overrides)
    if args.write_recipes:
        print("\n".join(write_recipes()))
    if args.recipes or args.write_recipes:
        print(f"{args.nodes} nodes x {GPUS_PER_NODE} A100-80GB; fits: estimate <= "
              f"{FIT_FRACTION:.0%} of {A100_GIB:.0f} GiB")
        print(recipe_table(args.nodes))
        return 0
    try:
        result = estimate(overrides, args.preset, args.tp, args.pp, args.dp, args.zero1,
                          args.sp, args.virtual_stages, args.encoder_stages)
    except ValueError as error:  # a layout the trainer would refuse: its message says why
        print(f"estimate_memory: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.preset}: tp={args.tp} pp={args.pp} dp={args.dp} zero1={args.zero1} "
          f"sp={args.sp} virtual_stages={args.virtual_stages} "
          f"encoder_stages={args.encoder_stages}")
    for key, value in result.items():
        print(f"  {key:<22} {value:12.3f}")
    return 0


def _layout_name(r: dict) -> str:
    ckpt = ", ckpt" if r["activation_checkpointing"] else ""
    zero = ", ZeRO-1" if r["zero1"] else ""
    virtual = f" (v{r['virtual_stages']})" if r["virtual_stages"] > 1 else ""
    return f"{r['tp']}x{r['pp']}{virtual}x{r['dp']}, mb {r['micro_batch']}{ckpt}{zero}"


def recipe_plan_table(nodes: int = 8, hw: Hardware | None = None, top: int = 3) -> str:
    """Markdown: per study recipe, its layout's modelled step time and rank among the layouts
    that fit (:func:`plan_layouts` on ``nodes`` x 8 A100-80GB), and the ``top`` fastest."""
    from megarch.config.train import STUDY_PAIRS

    hw = hw or Hardware()
    rows = ["| recipe | its layout: step s (rank / fitting) | fastest modelled layouts "
            "(step s) |", "|---|---|---|"]
    for preset, _, _ in STUDY_PAIRS:
        recipe = read_recipe(preset)
        cfg = load_train_config(preset, None, [])
        cfg.model.vocab_size = cfg.model.vocab_size or 32128
        plan = plan_layouts(cfg, nodes * hw.gpus_per_node, A100_GIB, hw)
        want = (int(recipe["TP"]), int(recipe["PP"]), 1, int(recipe["MICRO_BATCH"]),
                recipe["ACTIVATION_CHECKPOINTING"] == "true", recipe["ZERO1"] == "true")
        found = [(i, r) for i, r in enumerate(plan, 1)
                 if (r["tp"], r["pp"], r["virtual_stages"], r["micro_batch"],
                     r["activation_checkpointing"], r["zero1"]) == want]
        own = (f"{_layout_name(found[0][1])}: {found[0][1]['step_s']:.2f} "
               f"({found[0][0]} / {len(plan)})" if found else "does not fit")
        best = "; ".join(f"{_layout_name(r)} ({r['step_s']:.2f})" for r in plan[:top])
        rows.append(f"| {preset} | {own} | {best} |")
    return "\n".join(rows)


def _plan(parser: argparse.ArgumentParser, args: argparse.Namespace, overrides: list[str]
          ) -> int:
    for name in ("gpus", "gpu_mem", "bandwidth", "tp_bandwidth", "peak_tflops", "efficiency",
                 "top"):  # positive
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    from megarch.config.overrides import ConfigError

    try:
        cfg = load_train_config(args.preset, None, overrides)
    except ConfigError as error:
        parser.error(str(error))
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 32128
    if args.saturation_tokens < 0:
        parser.error(f"--saturation-tokens {args.saturation_tokens}: must be >= 0")
    hw = Hardware(args.peak_tflops, args.efficiency, args.bandwidth, args.tp_bandwidth,
                  args.saturation_tokens)
    rows = plan_layouts(cfg, args.gpus, args.gpu_mem, hw)
    print(f"{args.preset}: {args.gpus} GPUs x {args.gpu_mem:g} GiB (fits: <= "
          f"{FIT_FRACTION:.0%}), {hw.peak_tflops:g} TFLOP/s x {hw.efficiency:g}, DP "
          f"{hw.dp_gbps:g} GB/s, TP/PP {hw.tp_gbps:g} GB/s; {len(rows)} layouts fit")
    if not rows:
        print(f"estimate_memory: no layout of {args.gpus} GPUs fits {args.gpu_mem:g} GiB: "
              "add GPUs or memory", file=sys.stderr)
        return 2
    print(plan_table(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
