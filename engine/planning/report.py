"""The plan as one JSON-ready dict, and as readable tables."""

from __future__ import annotations

from engine.planning.activations import GPU_BACKEND, bf16_params
from engine.planning.memory import GIB, RUNTIME_RESERVE_GIB
from engine.planning.planner import Plan

GB = 1e9


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def stage_rows(plan: Plan) -> list[dict]:
    """One row per pipeline stage: all of its ranks hold the same shapes and memory."""
    cfg, lay = plan.cfg, plan.layout
    L = cfg.parallel.llm
    per_stage = L.tp * L.hp * lay.llm_dp
    rows = []
    for sh, mem in zip(plan.stages, plan.memory):
        ranges = [f"{r.start}-{r.stop - 1}" for r in sh.layers]
        rows.append({
            "stage": sh.stage,
            "ranks": per_stage,
            "first_rank": sh.stage * per_stage,
            "llm_layers": ranges,
            "params": {**mem.params, "total": sum(mem.params.values())},
            "memory_gib": {
                "weights": _gib(mem.weights),
                "grads": _gib(mem.grads),
                "optimizer": _gib(mem.optimizer),
                "activations": {k: _gib(v) for k, v in mem.activations.items()},
                "phases": {k: _gib(v) for k, v in mem.phases.items()},
                "peak_phase": mem.peak_phase,
                "peak_breakdown": {k: _gib(v) for k, v in mem.breakdown.items()},
                "runtime_reserve": RUNTIME_RESERVE_GIB,
                "peak": _gib(mem.peak),
            },
            "peak_memory_gb": round(mem.peak / GB, 2),
            "microbatch_s": round(plan.cost.stage_microbatch_s[sh.stage], 5),
        })
    return rows


def plan_dict(plan: Plan) -> dict:
    cfg, gpu = plan.cfg, plan.gpu
    L, V = cfg.parallel.llm, cfg.parallel.vit
    out: dict = {
        "ok": plan.ok,
        "message": plan.message(),
        "problems": plan.problems,
        "notes": plan.notes,
        "model": cfg.model.preset,
        "cluster": {"nodes": plan.nodes, "gpus_per_node": plan.gpus_per_node, "world": plan.world,
                    "gpu": gpu.name, "memory_gib": gpu.memory_gib, "usable_gib": _gib(plan.usable_bytes),
                    "margin": plan.margin, "peaks": {"bf16_tflops": gpu.bf16_tflops, "fp32_tflops": gpu.fp32_tflops,
                                                      "hbm_tb_s": gpu.hbm_tb_s, "nvlink_gb_s": gpu.nvlink_gb_s,
                                                      "network_gb_s": gpu.network_gb_s, "source": gpu.source}},
        "parallel": {"llm": {"tp": L.tp, "hp": L.hp, "pp": L.pp, "vpp": L.vpp, "sp": L.sp,
                             "microbatches": L.microbatches},
                     "vit": {"tp": V.tp, "hp": V.hp, "sp": V.sp}, "zero1": cfg.parallel.zero1,
                     "activation_checkpointing": cfg.train.activation_checkpointing},
        "total_params": plan.total_params,
        "max_rank_memory_gb": None,  # no layout, no estimate (see "problems")
    }
    if plan.layout is None:
        return out
    lay, work, cost = plan.layout, plan.workload, plan.cost
    out["parallel"]["llm"]["dp"] = lay.llm_dp
    out["parallel"]["vit"]["dp"] = lay.vit_dp
    out["max_rank_memory_gb"] = round(plan.max_rank_memory / GB, 2)
    out["max_rank_memory_gib"] = _gib(plan.max_rank_memory)
    out["workload"] = {"microbatch_tokens": work.tokens, "visual_share": round(work.visual_share, 4),
                       "attention_span": work.span, "tiles_per_microbatch": round(work.tiles_per_microbatch(cfg), 2),
                       "tiles_per_step": round(lay.tiles_per_step(cfg, work), 1),
                       "tiles_per_vit_rank": lay.vit_tiles(cfg, work),
                       "tokens_per_step": lay.llm_dp * L.microbatches * work.tokens}
    out["stages"] = stage_rows(plan)
    out["step"] = {"seconds": {k: round(v, 4) for k, v in cost.seconds.items()},
                   "bubble_fraction": round(cost.bubble, 4), "model_flops": cost.model_flops,
                   "mfu": round(cost.mfu, 4), "tokens_per_s": round(cost.tokens_per_s, 1),
                   "tokens_per_s_per_gpu": round(cost.tokens_per_s / plan.world, 1)}
    out["comm_gb_per_rank_step"] = {k: round(v / GB, 3) for k, v in cost.comm_bytes.items()}
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    last = len(headers) - 1

    def line(cells: list[str]) -> str:
        cols = (c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(cols).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def plan_text(plan: Plan) -> str:
    d = plan_dict(plan)
    cfg = plan.cfg
    L, V = cfg.parallel.llm, cfg.parallel.vit
    out = [f"{cfg.model.preset} on {plan.nodes} node(s) x {plan.gpus_per_node} {plan.gpu.name} = {plan.world} GPUs"]
    if plan.layout is None:
        out.append(plan.message())
        return "\n".join(out)
    lay, work = plan.layout, plan.workload
    sp = lambda on: "+sp" if on else ""  # noqa: E731
    out.append(f"LLM grid tp={L.tp}{sp(L.sp)} hp={L.hp} dp={lay.llm_dp} pp={L.pp} vpp={L.vpp}, "
               f"{L.microbatches} microbatches; ViT grid tp={V.tp}{sp(V.sp)} hp={V.hp} dp={lay.vit_dp}; "
               f"ZeRO-1 {'on' if cfg.parallel.zero1 else 'off'}, activation checkpointing "
               f"{'on' if cfg.train.activation_checkpointing else 'off'}")
    w = d["workload"]
    out.append(f"Workload (assumed): a microbatch is one packed row of {work.tokens} tokens, "
               f"{work.visual_share:.0%} of them visual -> {w['tiles_per_microbatch']} tiles per microbatch, "
               f"{w['tiles_per_step']} per step, {w['tiles_per_vit_rank']} per ViT rank; samples of "
               f"{work.span} tokens (causal attention)")
    first = plan.stages[0]
    out.append(f"Parameters: {plan.total_params:,} (ViT {_b(first.unique('vision_model.'))}, projector "
               f"{_b(first.unique('projector.'))}, LLM "
               f"{_b(sum(s.unique('language_model.') for s in plan.stages))})")
    out.append("")
    out.append("Per rank, GiB (every rank of a pipeline stage is alike; activations: LLM / ViT, full | checkpointed)")
    rows = []
    for r, mem in zip(d["stages"], plan.memory):
        mg, p, a = r["memory_gib"], r["params"], r["memory_gib"]["activations"]
        rows.append([str(r["stage"]), str(r["ranks"]), ",".join(r["llm_layers"]), _b(p["vit"]), _b(p["projector"]),
                     _b(p["llm"]), f"{mg['weights']:.1f}", f"{mg['grads']:.1f}", f"{mg['optimizer']:.1f}",
                     f"{a['llm_full']:.1f} | {a['llm_checkpointed']:.1f}",
                     f"{a['vit_full']:.1f} | {a['vit_checkpointed']:.1f}",
                     mg["peak_phase"].replace("_", " "), f"{mem.peak / GIB:.1f}"])
    out.append(_table(["stage", "ranks", "layers", "ViT", "proj", "LLM", "weights", "grads", "optim",
                       "act LLM", "act ViT", "peak at", "peak"], rows))
    bf16 = bf16_params(cfg, GPU_BACKEND)
    opt = ("ZeRO-1: fp32 master + 2 moments of the owned slice, 12 B/element" if cfg.parallel.zero1
           else "fp32 masters + AdamW moments, 12 B/param" if bf16 else "AdamW moments, 8 B/param")
    weights = ("weights bf16 2 B/param, fp32 main grads 4 B/param" if bf16
               else "weights fp32 4 B/param, grads fp32 4 B/param")
    copies = "" if bf16 else " (incl. bf16 weight copies)"
    out.append(f"{weights}, optimizer {opt}; activations under bf16 autocast{copies}; "
               f"peak includes {RUNTIME_RESERVE_GIB} GiB runtime reserve; usable "
               f"{d['cluster']['usable_gib']} of {plan.gpu.memory_gib} GiB ({plan.margin:.0%} margin)")
    s = d["step"]
    sec = s["seconds"]
    g = plan.gpu
    out.append("")
    out.append(f"Per step (roofline on datasheet peaks: {g.bf16_tflops:g} TFLOP/s bf16, {g.hbm_tb_s:g} TB/s HBM, "
               f"NVLink {g.nvlink_gb_s:g} GB/s, network {g.network_gb_s:g} GB/s per GPU; nothing measured)")
    out.append(f"  ViT {sec['vit']:.3f} s + exchange {sec['exchange']:.3f} s + pipeline {sec['pipeline']:.3f} s "
               f"(bubble {s['bubble_fraction']:.1%}) + dp {sec['dp']:.3f} s + optimizer {sec['optimizer']:.3f} s "
               f"= {sec['step']:.3f} s")
    out.append(f"  MFU {s['mfu']:.1%} (upper bound), {s['tokens_per_s']:.0f} tokens/s, "
               f"{s['tokens_per_s_per_gpu']:.0f} per GPU")
    spans = plan.spans
    sizes = {"llm.tp": L.tp, "llm.hp": L.hp, "llm.pp": L.pp, "llm.dp": lay.llm_dp * L.hp, "vit.tp": V.tp,
             "vit.hp": V.hp, "vit.dp": lay.vit_dp * V.hp, "exchange": plan.world}
    span_key = {"llm.dp": "llm.dp_hp", "vit.dp": "vit.dp_hp", "exchange": "world"}
    what = {"llm.tp": "all-gather/reduce-scatter (sp)" if L.sp and L.tp > 1 else "all-reduce",
            "llm.hp": "Ulysses all-to-all", "llm.pp": "p2p activations + gradients", "llm.dp": "grad all-reduce"
            + (" + ZeRO all-gather" if cfg.parallel.zero1 else ""),
            "vit.tp": "all-gather/reduce-scatter (sp)" if V.sp and V.tp > 1 else "all-reduce",
            "vit.hp": "Ulysses all-to-all", "vit.dp": "grad all-reduce" + (" + ZeRO all-gather" if cfg.parallel.zero1
                                                                           else ""),
            "exchange": "ViT->LLM embeddings and gradients (all-to-all)"}
    rows = [[k, str(sizes[k]), "network" if spans[span_key.get(k, k)] else "NVLink", f"{v:.2f}", what[k]]
            for k, v in d["comm_gb_per_rank_step"].items()]
    out.append("")
    out.append("Communication per rank per step (the slowest stage)")
    out.append(_table(["group", "size", "link", "GB", "what"], rows))
    out.append("")
    out.extend(f"note: {n}" for n in plan.notes)
    out.append(plan.message())
    return "\n".join(out)
