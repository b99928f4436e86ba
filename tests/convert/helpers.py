"""Small random T5 models written as save_pretrained directories, and a tiny T5 tokenizer."""

from __future__ import annotations

import json
import os

import torch

from megarch.convert.hf_t5 import import_transformers

VOCAB = 1024  # the tokenizer's 1000 ids padded, as T5 pads 32,100 to 32,128


def hf_config(tied: bool, enc_layers: int = 2, dec_layers: int = 3, **extra) -> dict:
    """A T5 v1.1-style config dict (gated-gelu) of a tiny model."""
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
        "vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": enc_layers,
        "num_decoder_layers": dec_layers, "num_heads": 4,
        "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
        "dropout_rate": 0.0, "layer_norm_epsilon": 1e-5, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True, "tie_word_embeddings": tied, "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0,
    }
    return config | extra


def write_hf_dir(path: str, config: dict, seed: int = 0, tokenizer: str | None = None,
                 weights: str = "safetensors") -> dict[str, torch.Tensor]:
    """Build ``config``'s HF model with random weights (bias tables and, untied, a head of
    their own: not HF's init), write it as save_pretrained lays it out; return the tensors."""
    from safetensors.torch import save_file

    transformers = import_transformers()
    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(**{k: v for k, v in config.items() if k != "architectures"})
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not k.endswith("embed_tokens.weight")}
    for name in state:
        if "relative_attention_bias" in name or "layer_norm" in name:
            state[name] = torch.randn_like(state[name]) * (0.5 if "layer_norm" in name else 1.0)
            if "layer_norm" in name:
                state[name] += 1.0
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"])
    os.makedirs(path, exist_ok=True)
    if weights == "safetensors":
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    if tokenizer is not None:
        with open(tokenizer, "rb") as src, open(os.path.join(path, "spiece.model"), "wb") as dst:
            dst.write(src.read())
    return state


def hf_model(path: str):
    """transformers' own model of directory ``path`` (float32, eval mode)."""
    transformers = import_transformers()
    return transformers.T5ForConditionalGeneration.from_pretrained(path).float().eval()
