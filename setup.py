from setuptools import find_packages, setup

setup(
    name="internvl-engine",
    version="0.1.0",
    description="A training engine for InternVL3-style vision-language models",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1; python_version >= '3.12'",
        "triton; platform_system == 'Linux'",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "safetensors",
        "sentencepiece",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "transformers>=4.52"],
    },
)
