"""The study's transformer LMs: attention with one mask vocabulary, blocks, models, loss, FLOPs.

Public API (see each module):

- :func:`build_model`, :func:`build_stage`, :class:`DecoderLM`, :class:`EncoderDecoderLM`
  (transformer); :class:`PipelineLayout`, :func:`pipeline_layout`, :func:`embedding_ranks`,
  :func:`stage_layers`: how the model is cut into pipeline stages (stages)
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
from megarch.model.stages import PipelineLayout, embedding_ranks, pipeline_layout, stage_layers
from megarch.model.transformer import DecoderLM, EncoderDecoderLM, build_model, build_stage

__all__ = [
    "DecoderLM",
    "PipelineLayout",
    "EncoderDecoderLM",
    "KVCache",
    "MaskMode",
    "attention",
    "build_mask",
    "build_model",
    "build_stage",
    "config_parameter_count",
    "count_parameters",
    "embedding_ranks",
    "lm_loss",
    "mfu",
    "model_flops_per_sample",
    "model_flops_per_token",
    "peak_flops",
    "pipeline_layout",
    "stage_layers",
]
