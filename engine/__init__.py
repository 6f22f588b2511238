"""A training engine for InternVL3-style vision-language models."""

from engine.config import Config, ConfigError, ModelConfig, load_config  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    if name == "InternVLModel":
        from engine.models.internvl import InternVLModel

        return InternVLModel
    raise AttributeError(name)
