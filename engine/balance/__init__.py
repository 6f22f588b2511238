"""Modality-aware load balancing of ViT tiles and LLM samples over data-parallel ranks."""

from engine.balance.assignment import Assignment, imbalance
from engine.balance.balancer import balance, naive
from engine.balance.cost import CostModel, fit_exchange, fit_llm, fit_vit
from engine.balance.layout import Layout, SampleShape

__all__ = ["Assignment", "CostModel", "Layout", "SampleShape", "balance", "fit_exchange", "fit_llm", "fit_vit",
           "imbalance", "naive"]
