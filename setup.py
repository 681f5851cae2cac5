from setuptools import find_packages, setup

setup(
    name="megatron-minitron",
    version="0.1.0",
    description="Minitron pruning and distillation for megatron-core GPT models",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    package_data={"megatron_minitron": ["assets/*", "assets/**/*", "configs/*.yaml"]},
    python_requires=">=3.10",
    # torch is not pinned: NGC containers bring their own build, CPU machines install torch==2.13.0 first.
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.20",  # 0.16.x on Python 3.11; 0.17-0.19 need 3.12 (README: megatron-core versions)
        "numpy",
        "pyyaml",
        "tqdm",
        "psutil",
        "sentencepiece",
        "packaging",
        "xxhash",  # checkpoint manifests (xxh3-64); CRC-32 from zlib when it is missing
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.45", "safetensors", "tokenizers", "triton",
             "six", "pydantic"],  # imported by the vendored Megatron-LM (tests/megatron_lm/vendor)
        "hf": ["transformers>=4.45", "safetensors", "tokenizers"],
        "wandb": ["wandb"],
        "triton": ["triton"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["minitron=megatron_minitron.cli:main"]},
)
