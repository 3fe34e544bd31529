"""megatron-sgtm: Selective Gradient Masking pretraining on megatron-core and DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="megatron-sgtm",
    version="0.1.0",
    description="Selective Gradient Masking (SGTM) for megatron-core and DeepSpeed pretraining",
    packages=find_packages(include=["megatron_sgtm", "megatron_sgtm.*"]),
    python_requires=">=3.10",
    # torch is deliberately unpinned: the Makefile installs the CPU build (torch==2.13.0) first
    # on machines without a GPU and keeps the machine's own torch on GPU machines.
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "numpy",
        "pyyaml",
        "safetensors",
        "einops",
        "webdataset",
        "wandb",
        "datasets",
        "tokenizers",
        "pyarrow",
        "transformers",
        "matplotlib",
    ],
    # eval: lm-evaluation-harness for `megatron-sgtm eval --lm-eval` (its hf backend needs the [hf] extra),
    # tested in CI too. datasets is required: `data build --hf-dataset` reads through `load_dataset`.
    extras_require={"test": ["pytest", "ruff", "psutil", "lm_eval[hf]==0.4.13"],
                    "eval": ["lm_eval[hf]==0.4.13"]},
    entry_points={"console_scripts": ["megatron-sgtm=megatron_sgtm.cli:main"]},
)
