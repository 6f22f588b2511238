"""``make_plan``: shards, memory, step cost and layout checks for a config on a cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.config import Config, ConfigError, validate_config
from engine.planning.activations import GPU_BACKEND, Backend
from engine.planning.cost import StepCost, group_spans, step_cost
from engine.planning.hardware import GPU
from engine.planning.memory import GIB, RUNTIME_RESERVE_GIB, Layout, StageMemory, Workload, stage_memory
from engine.planning.shards import StageShards, build_meta_model, stage_shards


@dataclass
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    gpu: GPU
    margin: float
    workload: Optional[Workload] = None
    layout: Optional[Layout] = None
    stages: list[StageShards] = field(default_factory=list)
    memory: list[StageMemory] = field(default_factory=list)
    cost: Optional[StepCost] = None
    spans: dict[str, bool] = field(default_factory=dict)  # which groups cross nodes
    total_params: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_gib * GIB * (1 - self.margin)

    @property
    def max_rank_memory(self) -> int:
        return max((m.peak for m in self.memory), default=0)

    def message(self) -> str:
        """One line: why the layout fails, or that it fits."""
        if self.ok:
            return (f"layout fits: {self.max_rank_memory / GIB:.1f} GiB on the fullest rank of "
                    f"{self.usable_bytes / GIB:.1f} GiB usable per {self.gpu.name}")
        return "layout does not work: " + "; ".join(self.problems)


def _config_problem(cfg: Config, world: int) -> Optional[str]:
    """The config's own rules for this world size (divisibility, heads, microbatches)."""
    from engine.parallel.parallelize import check_layout

    try:
        validate_config(cfg, world)
        check_layout(cfg, world)
    except ConfigError as e:
        return str(e)
    return None


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: GPU, margin: float = 0.1,
              visual_share: Optional[float] = None, backend: Backend = GPU_BACKEND) -> Plan:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must be >= 1")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"--margin={margin} must be in [0, 1)")
    plan = Plan(cfg, nodes, gpus_per_node, gpu, margin)
    model = build_meta_model(cfg)
    plan.total_params = sum(p.numel() for p in model.parameters())
    problem = _config_problem(cfg, plan.world)
    if problem:
        plan.problems.append(problem)
        return plan
    spans = plan.spans = group_spans(cfg, plan.world, gpus_per_node)
    for grid in ("llm", "vit"):
        if spans[f"{grid}.tp"]:
            plan.problems.append(f"parallel.{grid}.tp={getattr(cfg.parallel, grid).tp} groups span nodes of "
                                 f"{gpus_per_node} GPUs (tensor parallelism needs NVLink: tp must divide "
                                 f"--gpus-per-node)")
    for key in ("llm.hp", "vit.hp"):
        if spans[key]:
            plan.notes.append(f"{key} groups span nodes: the Ulysses all-to-alls run over the network")
    plan.workload = Workload.of(cfg, visual_share)
    plan.layout = Layout.of(cfg, plan.world)
    plan.stages = [stage_shards(model, cfg, p) for p in range(cfg.parallel.llm.pp)]
    plan.memory = [stage_memory(cfg, s, plan.layout, plan.workload, backend) for s in plan.stages]
    plan.cost = step_cost(cfg, plan.stages, plan.layout, plan.workload, gpu, spans, backend)
    # all ranks' unique parameters: one tp group's shards per stage, padding and kv replicas removed
    first = plan.stages[0]
    plan.total_params = (first.unique("vision_model.") + first.unique("projector.")
                         + sum(s.unique("language_model.") for s in plan.stages))
    over = [m for m in plan.memory if m.peak > plan.usable_bytes]
    if over:
        mem = max(over, key=lambda m: m.peak)
        top = sorted(mem.breakdown.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in top)
        others = f" ({len(over)} of {len(plan.memory)} stages do not fit)" if len(over) > 1 else ""
        plan.problems.append(
            f"pipeline stage {mem.stage} needs {mem.peak / GIB:.1f} GiB at its {mem.peak_phase.replace('_', ' ')} "
            f"peak ({parts} GiB, + {RUNTIME_RESERVE_GIB} runtime) but each {gpu.name} has "
            f"{plan.usable_bytes / GIB:.1f} GiB usable ({gpu.memory_gib} GiB less a {margin:.0%} margin){others}")
    return plan
