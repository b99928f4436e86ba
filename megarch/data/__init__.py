"""The data path: text -> tokens -> indexed dataset -> samples the model receives.

- ``tokenizers``: one interface over SentencePiece, ``tokenizer.json`` and bytes (T5 sentinels).
- ``corpus``: the embedded corpus (standard-library docstrings), for demos and tests.
- ``preprocess`` / ``indexed_dataset``: jsonl -> Megatron-compatible ``.bin``/``.idx`` (mmap).
- ``indices`` / ``blending``: cached, prefix-stable sample indices; splits; weighted blends.
- ``span_corruption`` / ``samples``: FLM, PLM, MLM and multitask samples (field names there).
- ``datasets`` / ``loader``: from a ``DataConfig`` to a dataset and this rank's micro-batches.
- ``inspect``: samples rendered for people.

``megarch.data.build_dataset`` and ``megarch.data.make_loader`` are the entry points, imported
on first use so that ``import megarch.data.tokenizers`` (a preprocessing worker) stays light.
"""

from __future__ import annotations

_LAZY = {"build_dataset": "megarch.data.datasets", "make_loader": "megarch.data.loader"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megarch.data' has no attribute {name!r}")

