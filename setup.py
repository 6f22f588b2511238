from setuptools import find_packages, setup

setup(
    name="internvl-engine",
    version="0.1.0",
    description="A training engine for InternVL3-style vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "safetensors",
        "sentencepiece",
        "transformers>=4.52",  # tokenizer directories (the released checkpoints' format), checkpoint conversion
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # megatron-core: only a test compares the tensor-parallel layers with its own (the engine never imports it)
        "dev": ["pytest", "pytest-timeout", "megatron-core==0.16.1; python_version < '3.12'",
                "megatron-core>=0.16.1; python_version >= '3.12'"],
        "flash": ["flash-attn"],  # FlashAttention-2 varlen kernels for document-masked attention on GPU
    },
)
