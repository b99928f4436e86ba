"""megarch: training and comparing transformer language-model architectures and objectives."""

from setuptools import find_packages, setup

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
        # No torch pin: a CUDA build of torch on a cluster pins its own triton.
        "torch>=2.4",
        "megatron-core>=0.16",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "matplotlib>=3.7",  # the study report's plots
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.5"],
        # The lm-evaluation-harness adapter (megarch-lm-eval); megarch imports without it.
        "lm-eval": ["lm-eval>=0.4.13,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "megarch-data=megarch.cli.data:main",
            "megarch-train=megarch.train:main",
            "megarch-eval=megarch.eval.cli:main",
            "megarch-lm-eval=megarch.eval.lm_eval_adapter:main",
            "megarch-study=megarch.study.cli:main",
        ],
    },
)
