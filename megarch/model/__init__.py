"""The study's transformer LMs: attention with one mask vocabulary, blocks, models, loss, FLOPs.

Public API (see each module):

- :func:`build_model`, :class:`DecoderLM`, :class:`EncoderDecoderLM` (transformer)
- :class:`MaskMode`, :func:`attention`, :func:`build_mask` (attention)
- :class:`KVCache`: keys/values for incremental decoding (cache)
- :func:`lm_loss` (loss)
- :func:`model_flops_per_token`, :func:`model_flops_per_sample`, :func:`count_parameters`,
  :func:`config_parameter_count`, :func:`peak_flops`, :func:`mfu` (flops)
"""

from megarch.model.attention import MaskMode, attention, build_mask
from megarch.model.cache import KVCache
from megarch.model.flops import (
    config_parameter_count,
    count_parameters,
    mfu,
    model_flops_per_sample,
    model_flops_per_token,
    peak_flops,
)
from megarch.model.loss import lm_loss
from megarch.model.transformer import DecoderLM, EncoderDecoderLM, build_model

__all__ = [
    "DecoderLM",
    "EncoderDecoderLM",
    "KVCache",
    "MaskMode",
    "attention",
    "build_mask",
    "build_model",
    "config_parameter_count",
    "count_parameters",
    "lm_loss",
    "mfu",
    "model_flops_per_sample",
    "model_flops_per_token",
    "peak_flops",
]
