"""Model FLOPs, parameter counts and MFU.

Notation: d = d_model, a = n_heads * head_dim (attention inner size: q and o), k =
n_kv_heads * head_dim (the k and v projections' size; k = a without grouped-query attention),
f = d_ff, V = vocab, n = layers of a stack, L = a stack's sequence length, and P = 2 d a + 2 d k
+ 3 d f (one self-attention layer's matmul weights: q, o, k, v, GEGLU). A matmul of an [m, c]
by a [c, n] matrix costs 2 m c n FLOPs. Forward FLOPs of one sample:

Decoder-only (CD, ND), L tokens::

    L * 2 * (n * P + d V)                        projections q,k,v,o + GEGLU + logits
    + n * 4 a L^2                                q k^T and probs @ v

Encoder-decoder, Le encoder and Ld decoder tokens (n_e, n_d layers)::

    Le * 2 * n_e * P + n_e * 4 a Le^2                                    encoder
    + Ld * 2 * (n_d * (P + 2 d a) + d V) + n_d * 4 a Ld^2                decoder (+ cross q, o)
    + Le * 2 * n_d * 2 d k                                               cross k, v on encoder
    + n_d * 4 a Ld Le                                                    cross scores and mix

Grouped-query attention shrinks only the k and v projections (and the KV cache): every query
head still scores every key, so the attention terms (4 a L^2) are unchanged.

Training counts forward + backward = 3 x forward (the backward computes gradients with respect
to both activations and weights: twice the forward). With n_layers * P + d V = N this is the
usual ``6 N`` per token plus ``12 n a L`` for attention (PaLM's MFU convention).

Masked attention is counted dense: every query against every key of its row, whatever the
mask, segments or padding (so CD, ND and any prefix split cost the same). A kernel that skips
masked tiles does less work than counted, which shows as a higher MFU. The embedding lookup,
norms, softmax, activation functions and position biases are not counted (all O(L d) or
O(L^2 heads), negligible next to the matmuls). The tied output projection counts as a matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from megarch.config.model import ModelConfig

# Dense bfloat16 tensor-core peaks (FLOP/s) from NVIDIA's data sheets, most specific first.
_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
)


def config_parameter_count(cfg: ModelConfig) -> int:
    """Parameters of the model ``cfg`` describes, in closed form (no model is built)."""
    d = cfg.d_model
    bias_table = cfg.rel_buckets * cfg.n_heads if cfg.position == "t5_relative" else 0
    shared = bias_table if cfg.rel_bias_shared else 0  # one table per stack, not per layer
    per_layer_bias = 0 if cfg.rel_bias_shared else bias_table
    attention = _attention_matmul(cfg)
    self_block = _stack_matmul(cfg) + 2 * d + per_layer_bias  # attention, GEGLU, 2 norms
    total = cfg.vocab_size * d + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    total += cfg.n_layers * self_block + d + shared  # layers and the final (encoder) norm
    if cfg.is_encoder_decoder:
        cross_block = self_block + attention + d  # + cross-attention and its norm
        total += cfg.decoder_layers * cross_block + d + shared
    return total


def _attention_matmul(cfg: ModelConfig) -> int:
    """2 d a + 2 d k: one attention's projections (q, o; k, v of the KV heads)."""
    return 2 * cfg.d_model * cfg.kv_dim * (cfg.n_heads + cfg.kv_heads)


def _stack_matmul(cfg: ModelConfig) -> int:
    """P of the module docstring: one self-attention layer's matmul weights."""
    return _attention_matmul(cfg) + 3 * cfg.d_model * cfg.d_ff


def model_flops_per_sample(
    cfg: ModelConfig,
    seq_len: int | None = None,
    *,
    encoder_len: int | None = None,
    decoder_len: int | None = None,
    training: bool = True,
) -> int:
    """FLOPs of one sample (module docstring): ``seq_len`` for decoders, ``encoder_len`` and
    ``decoder_len`` for the encoder-decoder; forward only when ``training`` is False."""
    d, a, vocab = cfg.d_model, cfg.n_heads * cfg.kv_dim, cfg.vocab_size
    per_layer = _stack_matmul(cfg)
    if not cfg.is_encoder_decoder:
        if seq_len is None:
            raise ValueError(f"{cfg.arch} FLOPs need seq_len")
        length, layers = seq_len, cfg.n_layers
        forward = length * 2 * (layers * per_layer + d * vocab) + layers * 4 * a * length**2
    else:
        if encoder_len is None or decoder_len is None:
            raise ValueError("encoder_decoder FLOPs need encoder_len and decoder_len")
        enc, dec = encoder_len, decoder_len
        n_e, n_d = cfg.n_layers, cfg.decoder_layers
        forward = enc * 2 * n_e * per_layer + n_e * 4 * a * enc**2
        forward += dec * 2 * (n_d * (per_layer + 2 * d * a) + d * vocab) + n_d * 4 * a * dec**2
        forward += enc * 2 * n_d * 2 * d * cfg.kv_heads * cfg.kv_dim  # cross k, v
        forward += n_d * 4 * a * dec * enc
    return 3 * forward if training else forward


def model_flops_per_token(
    cfg: ModelConfig,
    seq_len: int | None = None,
    *,
    encoder_len: int | None = None,
    decoder_len: int | None = None,
    training: bool = True,
) -> float:
    """FLOPs per sample divided by the tokens in it (``seq_len``, or ``encoder_len +
    decoder_len``: the study matches compute by tokens seen on both sides)."""
    flops = model_flops_per_sample(cfg, seq_len, encoder_len=encoder_len,
                                   decoder_len=decoder_len, training=training)
    tokens = encoder_len + decoder_len if cfg.is_encoder_decoder else seq_len
    return flops / tokens


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters of ``model`` (shared/tied tensors once); works on the meta device."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def peak_flops(device_name: str | None = None, override: float | None = None) -> float:
    """Dense bf16 peak FLOP/s of a GPU: ``override`` if given, else by name (A100 312e12,
    H100 SXM 989e12, H100 PCIe 756e12, H200 989e12). ``device_name`` defaults to the current
    CUDA device's name."""
    if override is not None:
        return float(override)
    if device_name is None:
        if not torch.cuda.is_available():
            raise ValueError("no CUDA device: pass device_name or override (peak FLOP/s)")
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    for key, peak in _PEAK_BF16:
        if key in name:
            return peak
    raise ValueError(
        f"unknown peak FLOP/s for {device_name!r}: pass override (e.g. 312e12 for an A100)"
    )


def mfu(flops_per_token: float, tokens_per_second: float, peak: float, n_devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over ``n_devices * peak``."""
    return flops_per_token * tokens_per_second / (peak * n_devices)
