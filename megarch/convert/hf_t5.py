"""Hugging Face T5 <-> megarch encoder-decoder: configs and weights, exact both ways.

Why our own mapping rather than a library: the two models are the same network under other
names, and the few real differences have to be handled by hand to stay exact:

- T5 does not scale attention logits by ``head_dim ** -0.5``; megarch does. Importing multiplies
  every query projection (self and cross) by ``sqrt(head_dim)``, exporting divides it back. For
  T5's head size 64 the factor is 8, a power of two, so the fold is bit-exact; for other head
  sizes it is within one rounding of float32.
- T5 keeps one relative-bias table per stack, in its first layer, shared by all layers:
  megarch's ``model.rel_bias_shared`` option (the first block holds it, all read it).
- Output layer: a config with ``tie_word_embeddings`` true (or absent, T5 v1.0's default)
  scales the decoder output by ``d_model ** -0.5`` and reuses the embedding (megarch
  ``tie_embeddings``); false (T5 v1.1, Flan-T5, mT5, T0) has no scaling and its own ``lm_head``.
- GEGLU with tanh-approximated GELU is ``feed_forward_proj = "gated-gelu"`` (``gelu_new``);
  ``wi_0`` is the gate (activated), ``wi_1`` the linear half.

Everything else (RMS layer norm and its epsilon, bucketing, padded vocabulary, the shared
embedding of encoder and decoder, differing depths) is the same in both. Unsupported configs
are refused before anything is written (:class:`ConvertError`, one line naming the field).

HF names: ``shared.weight``, ``lm_head.weight``, ``{encoder,decoder}.block.{i}.layer.{j}...``,
``{encoder,decoder}.final_layer_norm.weight``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator

import torch

from megarch.config.model import ModelConfig


class ConvertError(ValueError):
    """An input the converter cannot use; the message names the file or field and the fix."""


SUPPORTED_MODEL_TYPES = ("t5", "mt5")
SUPPORTED_FFN = ("gated-gelu", "gated-gelu_new")
HF_ARCHITECTURE = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration"}


def import_transformers():
    """``transformers``, importable beside megarch.

    megarch's top-level ``kernels`` package has the name of Hugging Face's ``kernels``
    distribution, which transformers imports when that distribution is installed; with
    megarch's on the path first that import fails. Hub kernels are not wanted here (plain
    CPU/GPU forwards for checking and loading), so they are switched off before transformers
    looks for them.
    """
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    import transformers.utils as hf_utils
    import transformers.utils.import_utils as hf_import_utils

    def unavailable(*args, **kwargs) -> bool:
        return False

    hf_import_utils.is_kernels_available = unavailable
    hf_utils.is_kernels_available = unavailable
    import transformers

    return transformers


# ----- configs -----------------------------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
    """The ``config.json`` of a ``save_pretrained`` directory, as a dict."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir}: not a directory; pass the folder save_pretrained wrote "
                           "(config.json + model.safetensors)")
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path} not found: pass a Hugging Face model directory") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path}: cannot read it ({err})") from None


def hf_scales_output(hf: dict) -> bool:
    """Whether HF's T5 scales the decoder output by ``d_model ** -0.5`` (tied embeddings)."""
    if "scale_decoder_outputs" in hf:  # transformers >= 5 writes it
        return bool(hf["scale_decoder_outputs"])
    return hf.get("tie_word_embeddings", True) is not False


def checked_model_config(fields: Callable[[], dict], where: str, family: str) -> ModelConfig:
    """``ModelConfig(**fields())``, validated: a field missing from the HF config (a KeyError
    of ``fields``) or an invalid result is one :class:`ConvertError` naming ``where``."""
    try:
        cfg = ModelConfig(**fields())
    except KeyError as err:
        raise ConvertError(f"{where}: field {err.args[0]!r} is missing; a {family} config has "
                           "it") from None
    try:
        return cfg.validate()
    except ValueError as err:
        raise ConvertError(f"{where}: maps to an invalid megarch model: {err}") from None


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """The megarch :class:`ModelConfig` computing the same function as HF config ``hf``."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{where}: model_type={model_type!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)} (T5ForConditionalGeneration) "
                           "and gemma (GemmaForCausalLM, a causal decoder)")
    ffn = hf.get("feed_forward_proj", "relu")
    if ffn not in SUPPORTED_FFN:
        raise ConvertError(f"{where}: feed_forward_proj={ffn!r} is not supported; supported: "
                           "'gated-gelu' (T5 v1.1, LM-adapted T5, Flan-T5, mT5, T0)")
    act = hf.get("dense_act_fn", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConvertError(f"{where}: dense_act_fn={act!r} is not supported; supported: "
                           "'gelu_new' (tanh-approximated GELU)")
    if hf.get("is_encoder_decoder", True) is False:
        raise ConvertError(f"{where}: is_encoder_decoder=false is not supported; supported: "
                           "T5 encoder-decoders")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != hf.get("num_heads"):
        raise ConvertError(f"{where}: num_key_value_heads={kv_heads} with num_heads="
                           f"{hf.get('num_heads')}: T5 has no grouped-query attention; only "
                           "multi-head T5 configs are supported")
    return checked_model_config(lambda: dict(
        arch="encoder_decoder", vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]), n_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]), d_ff=int(hf["d_ff"]), n_layers=int(hf["num_layers"]),
        n_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        dropout=float(hf.get("dropout_rate", 0.0)),
        rel_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        rel_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        rel_bias_shared=True, position="t5_relative",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        tie_embeddings=hf_scales_output(hf),
    ), where, "T5")


def hf_config_from_model(cfg: ModelConfig, model_type: str = "t5", pad_id: int = 0,
                         eos_id: int = 1) -> dict:
    """The HF ``config.json`` dict of megarch model ``cfg`` (which must be exportable)."""
    check_exportable(cfg)
    return {
        "architectures": [HF_ARCHITECTURE[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.kv_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.rel_buckets,
        "relative_attention_max_distance": cfg.rel_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings,
        "use_cache": True,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
        "decoder_start_token_id": pad_id,
        "dtype": "float32",
    }


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse a megarch model that no HF T5 computes exactly (one line: the field, the fix)."""
    if not cfg.is_encoder_decoder:
        raise ConvertError(
            f"model.arch={cfg.arch}: only encoder_decoder exports to Hugging Face (T5); no HF "
            "architecture computes megarch's decoder-only networks as they are (T5 relative "
            "bias in every layer, prefix masks; a rotary causal decoder would need Gemma with "
            "rescaled weights, not implemented)")
    if cfg.position != "t5_relative":
        raise ConvertError(f"model.position={cfg.position}: T5 uses t5_relative bias; "
                           "only such models export")
    if cfg.decoder_rel_bidirectional:
        raise ConvertError("model.decoder_rel_bidirectional=true has no T5 equivalent")
    if cfg.kv_heads != cfg.n_heads:
        raise ConvertError(f"model.n_kv_heads={cfg.kv_heads} with model.n_heads={cfg.n_heads}: "
                           "T5 has no grouped-query attention; only models with n_kv_heads "
                           "unset (= n_heads) export to T5")


# ----- weights -----------------------------------------------------------------------------------


def _stack_names(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(megarch name, HF name) of every block parameter (bias tables apart)."""
    for stack, hf_stack, n in (("encoder_blocks", "encoder", cfg.n_layers),
                               ("decoder_blocks", "decoder", cfg.decoder_layers)):
        ff_layer = 1 if stack == "encoder_blocks" else 2
        for i in range(n):
            m, h = f"{stack}.{i}", f"{hf_stack}.block.{i}.layer"
            for p in "qkvo":
                yield f"{m}.attn.{p}.weight", f"{h}.0.SelfAttention.{p}.weight"
            yield f"{m}.attn_norm.weight", f"{h}.0.layer_norm.weight"
            if stack == "decoder_blocks":
                for p in "qkvo":
                    yield f"{m}.cross.{p}.weight", f"{h}.1.EncDecAttention.{p}.weight"
                yield f"{m}.cross_norm.weight", f"{h}.1.layer_norm.weight"
            yield f"{m}.ff.wi_gate.weight", f"{h}.{ff_layer}.DenseReluDense.wi_0.weight"
            yield f"{m}.ff.wi_up.weight", f"{h}.{ff_layer}.DenseReluDense.wi_1.weight"
            yield f"{m}.ff.wo.weight", f"{h}.{ff_layer}.DenseReluDense.wo.weight"
            yield f"{m}.ff_norm.weight", f"{h}.{ff_layer}.layer_norm.weight"


def name_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(megarch name, HF name) of every megarch parameter (``rel_bias_shared`` models: the
    tables are the first blocks'; per-layer tables have no HF place and are not listed)."""
    names = [("embed.weight", "shared.weight")]
    names += list(_stack_names(cfg))
    names += [("encoder_norm.weight", "encoder.final_layer_norm.weight"),
              ("decoder_norm.weight", "decoder.final_layer_norm.weight")]
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    names += [("encoder_blocks.0.rel_bias.table", f"encoder.block.0.{bias}"),
              ("decoder_blocks.0.rel_bias.table", f"decoder.block.0.{bias}")]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", "lm_head.weight"))
    return names


def _is_query(megarch_name: str) -> bool:
    return megarch_name.endswith((".attn.q.weight", ".cross.q.weight"))


def hf_to_megarch(cfg: ModelConfig, get: Callable[[str], torch.Tensor | None],
                  where: str) -> dict[str, torch.Tensor]:
    """The megarch state dict of ``cfg`` from HF tensors (``get(name)``: the tensor or None),
    float32, with the attention scale folded into the queries."""
    fold = math.sqrt(cfg.kv_dim)
    if cfg.tie_embeddings:
        head, shared = get("lm_head.weight"), get("shared.weight")
        if head is not None and shared is not None and not torch.equal(head, shared):
            raise ConvertError(
                f"{where}: lm_head.weight differs from shared.weight but config.json ties them "
                "(tie_word_embeddings true: output scaled by d_model**-0.5); megarch has no "
                "scaled untied head: set tie_word_embeddings false if the head is its own")
    state = {}
    for ours, theirs in name_map(cfg):
        tensor = get(theirs)
        if tensor is None and theirs == "lm_head.weight":
            tensor = get("shared.weight")  # transformers >= 5 saves a v1.1 head tied
        if tensor is None:
            raise ConvertError(f"{where}: tensor {theirs!r} is missing; the weights do not "
                               "match config.json (pass the directory save_pretrained wrote)")
        tensor = tensor.float()
        state[ours] = tensor * fold if _is_query(ours) else tensor
    return state


def megarch_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor]
                  ) -> list[tuple[str, torch.Size, torch.dtype, Callable[[], torch.Tensor]]]:
    """(HF name, shape, dtype, a function making the tensor) per HF tensor, in name order, so
    a writer can make one tensor at a time. The query projections get the attention scale
    back."""
    check_exportable(cfg)
    fold = math.sqrt(cfg.kv_dim)
    if "encoder_blocks.0.rel_bias.table" not in state or "encoder_blocks.1.rel_bias.table" in state:
        raise ConvertError("the checkpoint has a bias table per layer (model.rel_bias_shared="
                           "false); T5 has one per stack, so it cannot export exactly")
    entries = []
    for ours, theirs in sorted(name_map(cfg), key=lambda pair: pair[1]):
        if ours not in state:
            raise ConvertError(f"the checkpoint has no {ours!r}: not a model of its config")

        def make(ours: str = ours) -> torch.Tensor:
            tensor = state[ours].detach()
            return (tensor.float() / fold).to(tensor.dtype) if _is_query(ours) else tensor

        entries.append((theirs, state[ours].shape, state[ours].dtype, make))
    return entries
