"""Layout planner: per-rank shards, memory, step cost and checks (``python -m engine.plan``)."""

from engine.planning.hardware import GPUS, get_gpu
from engine.planning.planner import Plan, make_plan
from engine.planning.report import plan_dict, plan_text

__all__ = ["GPUS", "get_gpu", "Plan", "make_plan", "plan_dict", "plan_text"]
