"""tools/convert_checkpoint.py: transformers <-> engine checkpoints for a layout, in one process.

A tiny random transformers InternVL model (odd vocabulary, 3 ViT heads, 1 kv head, so that tp 2
pads the vocabulary and the ViT heads and replicates the kv head) is converted to an engine
checkpoint for LLM tp2/pp2 + ViT tp2, loaded by 4 gloo ranks (each local shard checked against
the transformers weights), saved by them, converted back, and loaded by transformers: the
logits are bitwise those of the original model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed
from engine.checkpoint import CheckpointError, CheckpointReader
from engine.checkpoint.convert import to_engine, to_hf
from engine.checkpoint.plan import target_pieces
from engine.config import Config
from engine.models import hf_adapter as A

# transformers is imported inside the tests only: the spawned ranks import this module too.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX, VOCAB, IMAGE = 7, 101, 56
LAYOUT = ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=2", "parallel.vit.tp=2",
          "parallel.zero1=true"]


def tiny_hf(seed: int = 0):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=72,
                           image_size=IMAGE, patch_size=14, norm_type="layer_norm", attention_bias=True),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, intermediate_size=64, rope_theta=10000.0,
                         tie_word_embeddings=False),
        image_token_id=CTX, image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if re.search(r"norm[^.]*\.weight$", name) else 0.1 * noise)
    return model


@torch.no_grad()
def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(CTX + 1, VOCAB, (2, 16), generator=g)
    ids[0, 2:6] = CTX
    ids[1, 3:11] = CTX
    pixels = torch.randn(3, 3, IMAGE, IMAGE, generator=g)
    return model(input_ids=ids, pixel_values=pixels, position_ids=torch.arange(16)[None].expand(2, -1)).logits


def layout_config(model_cfg) -> Config:
    from engine.config import apply_override

    cfg = Config()
    cfg.model = model_cfg
    for o in LAYOUT:
        apply_override(cfg, o)
    return cfg


def load_and_save(rank: int, world: int, hf_dir: str, engine_dir: str, run_dir: str) -> dict:
    """Load the converted checkpoint under the layout, check every local shard, save it again."""
    from engine.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
    from engine.checkpoint.convert import model_config_of
    from engine.parallel.runner import ParallelRunner
    from engine.parallel.tensor_parallel import shard_info, shard_tensor
    from engine.trainer import build_model

    cfg = layout_config(model_config_of(CheckpointReader(engine_dir)))
    runner = ParallelRunner(build_model(cfg), cfg, torch.device("cpu"))
    loaded = load_checkpoint(engine_dir, runner, cfg)
    want = A.load_pretrained(hf_dir).state_dict()
    checked = []
    for name, p in runner.model.named_parameters():
        info = shard_info(p)
        grid = runner.topo.llm if info.grid == "llm" else runner.topo.vit
        expect = shard_tensor(want[name], info, grid.coord("tp"), grid.size("tp"))
        assert torch.equal(p.detach(), expect), f"rank {rank}: {name} differs from its shard of the source"
        checked.append(name)
    for shard, group in zip(runner.optimizer.shards, runner.optimizer.param_groups):  # ZeRO-1 masters follow
        assert torch.equal(group["params"][0].detach(), shard.owned([p.data for p in shard.params]))
    path = save_checkpoint(CheckpointManager(run_dir), 0, runner, cfg, {"step": 0}, None)
    return {"kind": loaded.kind, "checked": checked, "path": path}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    hf = tiny_hf()
    hf.save_pretrained(tmp / "hf")
    cfg = layout_config(A.hf_config_to_engine(hf.config.to_dict()))
    report = to_engine(str(tmp / "hf"), str(tmp / "engine"), cfg, out=lambda s: None)
    return hf, tmp, report


def test_round_trip_through_a_tp2_pp2_layout_gives_identical_logits(converted):
    hf, tmp, report = converted
    assert {f for f in report.files if f.endswith(".safetensors")} == {f"rank_0000{r}.safetensors" for r in range(4)}
    ranks = run_distributed(load_and_save, 4, str(tmp / "hf"), str(tmp / "engine"), str(tmp / "run"), timeout=240)
    assert all(r["kind"] == "weights" for r in ranks)
    checked = {n for r in ranks for n in r["checked"]}
    assert len(checked) == len(A.load_pretrained(str(tmp / "hf")).state_dict())  # every tensor lives somewhere

    # The live ranks stored exactly the pieces the offline plan gave the converter.
    saved, conv = CheckpointReader(ranks[0]["path"]), CheckpointReader(str(tmp / "engine"))
    assert saved.keys("model/") and set(saved.keys("model/")) == set(conv.keys("model/"))
    for key in conv.keys("model/"):
        pieces = lambda r: sorted((p["file"], tuple(p["offsets"]), tuple(p["sizes"]))  # noqa: E731
                                  for p in r.tensors[key]["pieces"])
        assert pieces(saved) == pieces(conv), key
    emb = conv.tensors["model/language_model.embed_tokens.weight"]
    assert emb["shape"] == [VOCAB, 32] and sorted(p["sizes"][0] for p in emb["pieces"]) == [50, 51]  # 102 padded
    kv = conv.tensors["model/language_model.layers.0.self_attn.k_proj.weight"]["pieces"]
    assert len(kv) == 1  # one kv head, replicated over tp 2, stored once

    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--input",
                    str(tmp / "run"), "--output", str(tmp / "back"), "--to", "hf"], check=True, capture_output=True)
    from transformers import InternVLForConditionalGeneration

    back = InternVLForConditionalGeneration.from_pretrained(str(tmp / "back")).eval()
    assert torch.equal(logits(back), logits(hf))
    for name, t in back.state_dict().items():
        assert torch.equal(t, hf.state_dict()[name]), name


def test_internvl_chat_source_with_fused_qkv(converted, tmp_path):
    hf, tmp, _ = converted
    model = A.load_pretrained(str(tmp / "hf"))
    A.save_pretrained(model, str(tmp_path / "chat"), format="internvl_chat")
    with open(tmp_path / "chat" / "config.json") as f:
        assert json.load(f)["model_type"] == "internvl_chat"
    cfg = layout_config(model.config)
    to_engine(str(tmp_path / "chat"), str(tmp_path / "engine"), cfg, out=lambda s: None)
    a, b = CheckpointReader(str(tmp_path / "engine")), CheckpointReader(str(tmp / "engine"))
    assert set(a.keys()) == set(b.keys())
    for key in a.keys():
        assert torch.equal(a.read(key), b.read(key)), key


def test_dry_run_prints_the_plan_and_writes_nothing(converted, tmp_path):
    _, tmp, _ = converted
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "--input",
                          str(tmp / "hf"), "--output", str(tmp_path / "x"), "--to", "engine", "--dry-run",
                          "--dtype", "bf16", *[a for o in LAYOUT for a in ("--set", o)]],
                         check=True, capture_output=True, text=True).stdout
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tmp")
    line = next(ln for ln in out.splitlines() if "-> language_model.embed_tokens.weight" in ln)
    assert "[101, 32] F32->BF16" in line and "padded 101->102" in line
    assert "rank 0 [0:51, 0:32]" in line and "rank 1 [51:101, 0:32]" in line
    line = next(ln for ln in out.splitlines() if "-> language_model.layers.1.self_attn.k_proj.weight" in ln)
    assert "2 tp replicas" in line and "pp stage 1" in line and "rank 2 [0:8, 0:32]" in line
    line = next(ln for ln in out.splitlines() if "-> vision_model.layers.0.attn.q_proj.weight" in ln)
    assert "padded 36->48" in line and "rank 0 [0:24, 0:36]" in line and "rank 1 [24:36, 0:36]" in line
    assert "dry run:" in out and "nothing written" in out


def test_dtype_cast_and_sharded_transformers_output(converted, tmp_path):
    hf, tmp, _ = converted
    to_hf(str(tmp / "engine"), str(tmp_path / "bf16"), torch.bfloat16, max_shard_size="50KB", out=lambda s: None)
    with open(tmp_path / "bf16" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    files = set(weight_map.values())
    assert len(files) > 1 and all(os.path.getsize(tmp_path / "bf16" / f) < 50_000 + 4096 for f in files)
    from transformers import InternVLForConditionalGeneration

    back = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    for name, t in back.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, hf.state_dict()[name].bfloat16()), name


def test_mismatched_shapes_and_bad_inputs_are_refused(converted, tmp_path, capsys):
    hf, tmp, _ = converted
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(tmp / "hf" / "model.safetensors"))
    tensors["language_model.model.layers.1.mlp.up_proj.weight"] = torch.zeros(63, 32)
    save_file(tensors, str(bad / "model.safetensors"))
    with open(tmp / "hf" / "config.json") as f:
        config = json.load(f)
    with open(bad / "config.json", "w") as f:
        json.dump(config, f)
    cfg = layout_config(A.hf_config_to_engine(config))
    with pytest.raises(CheckpointError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight.*"
                                              r"checkpoint \(63, 32\), model \(64, 32\)"):
        to_engine(str(bad), str(tmp_path / "out"), cfg, out=lambda s: None)
    assert not os.path.exists(tmp_path / "out")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors: language_model\.model\.layers\.1\.mlp\.up_proj"):
        to_engine(str(bad), str(tmp_path / "out"), cfg, out=lambda s: None)

    from tools.convert_checkpoint import main

    args = ["--input", str(tmp / "hf"), "--to", "engine"]
    assert main(args + ["--output", str(tmp_path / "y"), "--set", "parallel.llm.tp=3"]) == 2
    assert "parallel.llm.tp=3 must divide model.llm.num_heads=4" in capsys.readouterr().err
    assert main(args + ["--output", str(tmp / "engine")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["--input", str(tmp / "hf"), "--output", str(tmp_path / "z"), "--to", "hf"]) == 2
    assert "is a hf directory, not an engine checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "z")


def test_target_pieces_cover_each_tensor_once(converted):
    _, tmp, _ = converted
    reader = CheckpointReader(str(tmp / "engine"))
    from engine.checkpoint.convert import model_config_of

    for world, extra in ((4, []), (8, ["parallel.llm.hp=2"]), (2, ["parallel.llm.tp=1", "parallel.llm.pp=1"])):
        cfg = layout_config(model_config_of(reader))
        from engine.config import apply_override

        for o in extra:
            apply_override(cfg, o)
        for key in reader.keys("model/"):
            shape = reader.shape(key)
            pieces = target_pieces(key[len("model/"):], shape, cfg, world)
            assert sum(torch.Size(b[1]).numel() for _, b in pieces) == torch.Size(shape).numel(), (world, key)
            assert all(0 <= r < world for r, _ in pieces)
