"""The Hugging Face bridge: T5-family checkpoints into megarch encoder-decoders and back.

- :mod:`megarch.convert.hf_t5`: the config and weight-name mapping (exact, see its docstring);
- :mod:`megarch.convert.hf_gemma`: rotary causal decoders out as Gemma (the one decoder-only
  export: other megarch decoders have no HF twin);
- :mod:`megarch.convert.weights`: reading HF weight files, writing safetensors tensor by tensor;
- :mod:`megarch.convert.tokenizer`: the tokenizer files on both sides;
- :mod:`megarch.convert.cli`: ``megarch-convert from-hf`` / ``to-hf`` (also
  ``python -m megarch.convert`` and ``tools/convert_hf.py``).

It uses megarch.model and megarch.training's checkpoint writer/reader; nothing uses it back.
"""

from megarch.convert.cli import from_hf, main, to_hf
from megarch.convert.hf_t5 import ConvertError

__all__ = ["ConvertError", "from_hf", "main", "to_hf"]
