"""The data path: text -> tokens -> indexed dataset -> samples the model receives.

- ``tokenizers``: one interface over SentencePiece, ``tokenizer.json`` and bytes (T5 sentinels).
- ``corpus``: the embedded corpus (standard-library docstrings), for demos and tests.
- ``preprocess`` / ``indexed_dataset``: jsonl -> Megatron-compatible ``.bin``/``.idx`` (mmap).
- ``indices`` / ``blending``: cached, prefix-stable sample indices; splits; weighted blends.
- ``span_corruption`` / ``samples``: FLM, PLM, MLM and multitask samples (field names there).
- ``datasets`` / ``loader``: from a ``DataConfig`` to a dataset and this rank's micro-batches.
- ``inspect``: samples rendered for people.
"""
