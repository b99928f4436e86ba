"""megarch: training and comparing transformer language-model architectures and objectives."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "megarch-lm-eval.pth"
PTH_LINE = (
    "import sys; exec('try:\\n from megarch.lm_eval_plugin import install\\n install()\\n"
    "except Exception:\\n pass')\n"
)
"""Installed into site-packages: lets the stock ``lm_eval --model megarch`` find our model
(megarch/lm_eval_plugin.py says how; a failure is silent, never an error at Python start)."""


def _write_pth(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PTH_NAME), "w", encoding="utf-8") as f:
        f.write(PTH_LINE)


class BuildWithLmEvalHook(build_py):
    """build_py that also puts :data:`PTH_NAME` at the root of the build (site-packages)."""

    def run(self):
        super().run()
        if not self.dry_run:
            _write_pth(self.build_lib)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


class EditableWithLmEvalHook(editable_wheel):
    """``pip install -e``: the editable wheel gets :data:`PTH_NAME` at its root too. setuptools
    offers no public hook for extra root files; its namespace step writes into the unpacked
    wheel's root, so we add ours there (skipped silently if a setuptools renames that step:
    ``megarch-lm-eval`` still works then)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        _write_pth(installation_dir)


setup(
    name="megarch",
    version="0.1.0",
    description=(
        "Train and compare causal, non-causal and encoder-decoder transformer LMs "
        "under full-LM, prefix-LM and span-corruption objectives, from one CPU to GPU clusters."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megarch", "megarch.*", "kernels", "kernels.*"]),
    install_requires=[
        # No upper pin: a CUDA build of torch on a cluster pins its own triton. 2.6 is the
        # oldest with every API megarch calls (torch.nn.utils.get_total_norm and
        # clip_grads_with_norm_, in the training loop; README "Install" lists the others).
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "safetensors>=0.4",  # checkpoint weights and RNG states (megarch.training.checkpoint)
        "matplotlib>=3.7",  # the study report's plots
        "google-crc32c>=1.5",  # TFRecord CRCs (megarch/data/p3/tfrecord.py keeps a fallback)
        "safetensors>=0.4",
    ],
    extras_require={
        # What the test suite needs beyond megarch itself (the HF bridge's tests use
        # transformers); `.ci/run` installs dev, lm-eval and megatron.
        "dev": ["pytest>=8", "ruff>=0.5", "transformers>=4.40"],
        # megatron-core: only the interop tests (megatron-core reads our .bin/.idx and we read
        # its) and the baseline of tools/bench_data.py; megarch itself never imports it.
        "megatron": ["megatron-core>=0.16"],
        # The lm-evaluation-harness adapter (megarch-lm-eval); megarch imports without it.
        "lm-eval": ["lm-eval>=0.4.13,<0.5"],
    },
    cmdclass={"build_py": BuildWithLmEvalHook, "editable_wheel": EditableWithLmEvalHook},
    entry_points={
        "console_scripts": [
            "megarch-data=megarch.cli.data:main",
            "megarch-train=megarch.train:main",
            "megarch-eval=megarch.eval.cli:main",
            "megarch-lm-eval=megarch.eval.lm_eval_adapter:main",
            "megarch-study=megarch.study.cli:main",
            "megarch-bench-attention=kernels.bench:main",
            "megarch-convert=megarch.convert.cli:main",
        ],
    },
)
