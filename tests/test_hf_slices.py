"""CheckpointSliceReader: slices of engine tensors read straight from saved transformers checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import hf_adapter as A
from engine.models.hf_slices import CheckpointSliceReader
from engine.models.internvl import InternVLModel
from engine.models.presets import preset_model_config

# (engine name, dim, start, stop): fused-in-chat q/k/v parts, o_proj columns, embedding rows, biases, norms
SLICES = [
    ("vision_model.layers.0.attn.k_proj.weight", 0, 10, 40),
    ("vision_model.layers.1.attn.v_proj.weight", 1, 3, 17),
    ("vision_model.layers.1.attn.q_proj.bias", 0, 0, 32),
    ("vision_model.layers.0.attn.v_proj.bias", 0, 40, 64),
    ("language_model.layers.1.self_attn.o_proj.weight", 1, 32, 96),
    ("language_model.embed_tokens.weight", 0, 100, 300),
    ("language_model.layers.0.self_attn.k_proj.bias", 0, 16, 48),
    ("language_model.norm.weight", 0, 5, 6),
    ("vision_model.layers.0.norm1.weight", 0, 0, 64),
    ("projector.linear_1.weight", -1, 128, 256),
    ("vision_model.embeddings.patch_embedding.weight", 1, 1, 3),
]
WHOLE = ["vision_model.layers.0.attn.q_proj.weight", "vision_model.layers.1.attn.k_proj.bias",
         "language_model.lm_head.weight", "language_model.norm.weight", "vision_model.embeddings.class_embedding",
         "projector.layer_norm.bias"]


def tiny_model(tie: bool = False) -> InternVLModel:
    cfg = preset_model_config("tiny")
    cfg.llm.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = InternVLModel(cfg)
    with torch.no_grad():  # every tensor random, so no mapping error can hide behind zeros / ones
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        if tie:
            model.language_model.lm_head.weight.copy_(model.language_model.embed_tokens.weight)
    return model


@pytest.fixture(scope="module")
def model() -> InternVLModel:
    return tiny_model()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fmt in (A.HF, A.CHAT):
        for shard in (None, 40_000):
            d = str(root / f"{fmt}-{'sharded' if shard else 'single'}")
            A.save_pretrained(model, d, format=fmt, max_shard_size=shard)
            out[f"{fmt}-{'sharded' if shard else 'single'}"] = d
    return out


def shards(d: str) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def copy(src: str, dst) -> str:
    return shutil.copytree(src, str(dst))


def check_reads(reader: CheckpointSliceReader, model: InternVLModel) -> None:
    sd = model.state_dict()
    for name, dim, a, b in SLICES:
        got = reader.read(name, dim, a, b)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, sd[name].narrow(dim, a, b - a)), name
    for name in WHOLE:
        assert reader.shape(name) == tuple(sd[name].shape)
        assert torch.equal(reader.read(name), sd[name]), name
    assert torch.equal(reader.read(SLICES[0][0], 0, 5), sd[SLICES[0][0]][5:])  # stop defaults to the end


@pytest.mark.parametrize("layout", ["hf-single", "hf-sharded", "internvl_chat-single", "internvl_chat-sharded"])
def test_slices_match_the_model(model, saved, layout):
    d = saved[layout]
    if layout.endswith("sharded"):
        assert len(shards(d)) >= 3 and os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    with CheckpointSliceReader(d, model.config) as reader:
        assert reader.format == layout.rsplit("-", 1)[0]
        check_reads(reader, model)
        if layout.endswith("sharded"):
            assert len(reader._handles) > 1  # one open handle per shard file touched, kept between reads
    assert not reader._handles


def test_dtype_and_reopen_after_close(model, saved):
    reader = CheckpointSliceReader(saved["internvl_chat-single"], model.config)
    name = "vision_model.layers.0.attn.k_proj.weight"
    got = reader.read(name, 1, 8, 24, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, model.state_dict()[name][:, 8:24].to(torch.bfloat16))
    reader.close()
    assert torch.equal(reader.read(name), model.state_dict()[name])
    reader.close()


def test_in_memory_hf_names(model, saved, tmp_path):
    """transformers' in-memory spelling (model.language_model.*, lm_head.*) is read too."""
    d = copy(saved["hf-single"], tmp_path / "c")
    file = os.path.join(d, "model.safetensors")
    renames = [("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
               ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]
    tensors = {}
    for n, t in load_file(file).items():
        for old, new in renames:
            if n.startswith(old):
                n = new + n[len(old):]
                break
        tensors[n] = t
    save_file(tensors, file)
    with CheckpointSliceReader(d, model.config) as reader:
        check_reads(reader, model)


def test_bin_fallback(model, saved, tmp_path):
    d = copy(saved["internvl_chat-single"], tmp_path / "c")
    torch.save(load_file(os.path.join(d, "model.safetensors")), os.path.join(d, "pytorch_model.bin"))
    os.remove(os.path.join(d, "model.safetensors"))
    with CheckpointSliceReader(d, model.config) as reader:
        check_reads(reader, model)


def test_tied_embeddings(tmp_path):
    model = tiny_model(tie=True)
    A.save_pretrained(model, str(tmp_path), format=A.CHAT)
    assert "language_model.lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    with CheckpointSliceReader(str(tmp_path), model.config) as reader:
        emb = model.state_dict()["language_model.embed_tokens.weight"]
        assert torch.equal(reader.read("language_model.lm_head.weight", 0, 64, 128), emb[64:128])
        assert torch.equal(reader.read("language_model.lm_head.weight", 1, 0, 7), emb[:, :7])


def test_format_from_config_when_names_say_neither(model, tmp_path):
    """Only LLM tensors (names shared by both formats): the format comes from config.json."""
    cfg = preset_model_config("tiny")
    sd = {k: v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    expected = {k: tuple(v.shape) for k, v in sd.items()}
    A.save_pretrained(model, str(tmp_path), format=A.CHAT)
    file = str(tmp_path / "model.safetensors")
    save_file({k: v for k, v in load_file(file).items() if k.startswith("language_model.")}, file)
    with CheckpointSliceReader(str(tmp_path), cfg, expected=expected) as reader:
        assert reader.format == A.CHAT
        name = "language_model.layers.2.mlp.down_proj.weight"
        assert torch.equal(reader.read(name, 1, 100, 200), sd[name][:, 100:200])


# ----------------------------------------------------------------------------- errors


def test_missing_tensor_names_tensor_and_file(model, saved, tmp_path):
    d = copy(saved["hf-single"], tmp_path / "c")
    file = os.path.join(d, "model.safetensors")
    tensors = load_file(file)
    del tensors["language_model.model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, file)
    reader = CheckpointSliceReader(d, model.config)
    with pytest.raises(KeyError, match=r"language_model\.layers\.1\.self_attn\.o_proj\.weight.*"
                                       r"language_model\.model\.layers\.1\.self_attn\.o_proj\.weight.*"
                                       + re.escape(file)):
        reader.read("language_model.layers.1.self_attn.o_proj.weight", 1, 0, 8)
    assert torch.equal(reader.read("language_model.norm.weight"), model.state_dict()["language_model.norm.weight"])
    reader.close()


def test_missing_from_shard_it_is_indexed_in(model, saved, tmp_path):
    d = copy(saved["internvl_chat-sharded"], tmp_path / "c")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["vision_model.encoder.layers.0.attn.qkv.weight"]
    file = os.path.join(d, shard)
    tensors = load_file(file)
    del tensors["vision_model.encoder.layers.0.attn.qkv.weight"]
    save_file(tensors, file)
    with CheckpointSliceReader(d, model.config) as reader, \
            pytest.raises(KeyError, match=r"vision_model\.layers\.0\.attn\.v_proj\.weight.*"
                                          r"vision_model\.encoder\.layers\.0\.attn\.qkv\.weight.*" + re.escape(file)):
        reader.read("vision_model.layers.0.attn.v_proj.weight", 0, 0, 4)


def test_shape_mismatch(model, saved):
    name = "vision_model.layers.0.attn.k_proj.weight"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected[name] = (32, 64)
    d = saved["internvl_chat-single"]
    with CheckpointSliceReader(d, model.config, expected=expected) as reader:
        with pytest.raises(ValueError, match=re.escape(name) + r".*vision_model\.encoder\.layers\.0\.attn\.qkv"
                                             r"\.weight.*" + re.escape(os.path.join(d, "model.safetensors"))
                                             + r".*\(64, 64\).*\(32, 64\)"):
            reader.read(name, 0, 0, 8)
        with pytest.raises(ValueError, match=re.escape(name)):
            reader.shape(name)


def test_truncated_shard_names_file(model, saved, tmp_path):
    d = copy(saved["hf-sharded"], tmp_path / "c")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["language_model.model.embed_tokens.weight"]
    file = os.path.join(d, shard)
    os.truncate(file, os.path.getsize(file) - 100)
    with CheckpointSliceReader(d, model.config) as reader, \
            pytest.raises(ValueError, match=r"embed_tokens.*" + re.escape(file)):
        reader.read("language_model.embed_tokens.weight", 0, 0, 10)


def test_truncated_single_file_names_file(model, saved, tmp_path):
    d = copy(saved["hf-single"], tmp_path / "c")
    file = os.path.join(d, "model.safetensors")
    os.truncate(file, 1000)
    with pytest.raises(ValueError, match=re.escape(file)):
        CheckpointSliceReader(d, model.config)


def test_missing_shard_names_file(model, saved, tmp_path):
    d = copy(saved["internvl_chat-sharded"], tmp_path / "c")
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    shard = weight_map["language_model.model.norm.weight"]
    os.remove(os.path.join(d, shard))
    with CheckpointSliceReader(d, model.config) as reader:
        with pytest.raises(FileNotFoundError, match=r"language_model\.norm\.weight.*" + re.escape(shard)):
            reader.read("language_model.norm.weight")
        other = next(k for k, s in weight_map.items() if s != shard and k.startswith("language_model.model.layers"))
        engine = other.replace("language_model.model.", "language_model.", 1)
        assert torch.equal(reader.read(engine), model.state_dict()[engine])  # other shards still read


def test_bad_requests(model, saved):
    with CheckpointSliceReader(saved["hf-single"], model.config) as reader:
        with pytest.raises(KeyError, match="not an engine tensor"):
            reader.read("language_model.nope.weight")
        with pytest.raises(ValueError, match=r"o_proj.*out of range"):
            reader.read("language_model.layers.0.self_attn.o_proj.weight", 1, 100, 200)
        with pytest.raises(ValueError, match=r"o_proj.*dim=2"):
            reader.read("language_model.layers.0.self_attn.o_proj.weight", 2, 0, 1)
