"""Checkpoint interop with transformers' InternVL and the remote-code internvl_chat layout.

Tiny random transformers models are saved, loaded into the engine and compared on logits;
engine models are exported and loaded back (exactly) and into transformers.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: E402

from engine.config import ConfigError  # noqa: E402
from engine.models import hf_adapter as A  # noqa: E402
from engine.models.internvl import InternVLModel  # noqa: E402
from engine.models.presets import preset_model_config  # noqa: E402

CTX = 7  # <IMG_CONTEXT> id of the tiny models
VOCAB = 96
TOL = 1e-4


# ----------------------------------------------------------------------------- builders


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm weights around 1) so that no mapping error can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if re.search(r"norm[^.]*\.weight$", name):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def hf_model(flavour: str, image_size: int = 56, vit_layers: int = 2, feature_layer: int = -1,
             tie: bool = False, seed: int = 0) -> InternVLForConditionalGeneration:
    six = flavour == "6b"
    side = image_size // 14
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=vit_layers, num_attention_heads=4, intermediate_size=64,
                           image_size=image_size, patch_size=14, norm_type="rms_norm" if six else "layer_norm",
                           attention_bias=not six, use_qk_norm=six),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, rope_theta=10000.0,
                         tie_word_embeddings=tie),
        image_token_id=CTX, image_seq_length=(side // 2) ** 2, downsample_ratio=0.5,
        vision_feature_layer=feature_layer, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    if tie:
        model.tie_weights()
    return model


def batch(tokens_per_tile: int, image_size: int, vocab: int = VOCAB, ctx: int = CTX, seed: int = 0):
    """Two unpadded rows: row 0 holds a 1-tile image, row 1 a 2-tile image (3 tiles in all)."""
    g = torch.Generator().manual_seed(seed)
    T = tokens_per_tile
    S = 2 * T + 8
    ids = torch.randint(ctx + 1, vocab, (2, S), generator=g)
    ids[0, 3:3 + T] = ctx
    ids[1, 2:2 + 2 * T] = ctx
    pixels = torch.randn(3, 3, image_size, image_size, generator=g)
    return ids, pixels


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    return model(input_ids=ids, pixel_values=pixels, position_ids=positions).logits


@torch.no_grad()
def engine_logits(model: InternVLModel, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    assert model.config.v2pe_delta == 1.0
    return model(ids, pixels)


def pixel_shuffle_v1(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's ps_version v1: the v2 shuffle without its final H/W swap."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
    return x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor**2))


def chat_config(hf: InternVLForConditionalGeneration, ps_version: str) -> dict:
    """An InternVL3-style remote-code config.json for the same dimensions."""
    v, t = hf.config.vision_config, hf.config.text_config
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "model_type": "internvl_chat",
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": v.image_size[0],
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": ps_version, "select_layer": -1,
        "template": "internvl2_5", "use_thumbnail": True, "use_backbone_lora": 0, "use_llm_lora": 0,
        "torch_dtype": "float32",
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                       "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                       "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                       "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size,
                       "rms_norm_eps": t.rms_norm_eps, "rope_theta": 10000.0, "max_position_embeddings": 32768,
                       "tie_word_embeddings": False, "use_sliding_window": False},
        "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                          "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "intermediate_size": v.intermediate_size,
                          "image_size": v.image_size[0], "patch_size": v.patch_size[0], "norm_type": v.norm_type,
                          "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm,
                          "layer_norm_eps": v.layer_norm_eps, "initializer_factor": 0.1, "hidden_act": "gelu",
                          "drop_path_rate": 0.0, "use_flash_attn": True},
    }


def write_chat_checkpoint(hf, path: str, ps_version: str) -> dict:
    cfg = A.hf_config_to_engine(hf.config.to_dict())
    tensors = A.engine_to_chat(A.hf_to_engine(hf.state_dict(), cfg), cfg)
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(chat_config(hf, ps_version), f)
    return tensors


# ----------------------------------------------------------------------------- transformers -> engine


@pytest.mark.parametrize("flavour,image_size,vit_layers,feature_layer,tie", [
    ("300m", 56, 2, -1, False),
    ("6b", 112, 2, -1, False),
    ("300m", 112, 3, -2, False),  # one ViT layer past the selected one
    ("6b", 56, 3, 1, True),  # positive layer index; tied LM head
])
def test_transformers_checkpoint_logits_match(tmp_path, flavour, image_size, vit_layers, feature_layer, tie):
    hf = hf_model(flavour, image_size, vit_layers, feature_layer, tie)
    hf.save_pretrained(tmp_path)
    model, info = A.load_pretrained(str(tmp_path), output_loading_info=True)
    cfg = model.config
    assert info.format == "hf" and not info.missing and not info.unexpected
    assert cfg.vision.norm_type == ("rms_norm" if flavour == "6b" else "layer_norm")
    assert cfg.vision.qk_normalization == (flavour == "6b") and cfg.vision.qkv_bias == (flavour != "6b")
    assert (cfg.llm.num_heads, cfg.llm.num_kv_heads, cfg.llm.tie_word_embeddings) == (4, 2, tie)
    assert cfg.img_context_token_id == CTX and cfg.select_layer == feature_layer
    used = vit_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    assert len(model.vision_model.layers) == used
    skipped = {m.group(1) for s in info.ignored if (m := re.match(r"vision_tower\.encoder\.layer\.(\d+)\.", s))}
    assert skipped == {str(i) for i in range(used, vit_layers)}

    ids, pixels = batch(cfg.num_image_token, image_size)
    ref = hf_logits(hf, ids, pixels)
    out = engine_logits(model, ids, pixels)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= TOL

    # The in-memory names of transformers map to the same engine tensors.
    mem = A.hf_to_engine(hf.state_dict(), cfg)
    assert set(mem) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(mem[k], v), k


def test_transformers_writes_on_disk_names(tmp_path):
    hf = hf_model("6b")
    hf.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "vision_tower.encoder.layer.0.attention.q_norm.weight" in names
    assert "language_model.model.embed_tokens.weight" in names and "language_model.lm_head.weight" in names
    assert not any(n.startswith(("model.", "lm_head.")) for n in names)
    assert A.detect_key_format(sorted(names)) == "hf"
    assert A.detect_key_format(list(hf.state_dict())) == "hf"


def test_unsupported_settings_are_refused(tmp_path):
    hf = hf_model("300m")
    d = hf.config.to_dict()
    # transformers runs other downsample ratios (its projector takes C / ratio^2 inputs); the engine
    # supports 0.5 only and must say so rather than build a different model.
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump({**d, "downsample_ratio": 0.25}, f)
    with pytest.raises(ConfigError, match="downsample_ratio=0.25"):
        A.load_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="text_config.model_type='llama'"):
        A.hf_config_to_engine({**d, "text_config": {**d["text_config"], "model_type": "llama"}})
    with pytest.raises(ConfigError, match="vision_feature_select_strategy='full'"):
        A.hf_config_to_engine({**d, "vision_feature_select_strategy": "full"})
    with pytest.raises(ConfigError, match="rope_type"):
        A.hf_config_to_engine({**d, "text_config": {**d["text_config"],
                                                     "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}})


# ----------------------------------------------------------------------------- internvl_chat -> engine


@pytest.mark.parametrize("flavour,ps_version", [("300m", "v2"), ("6b", "v2"), ("300m", "v1")])
def test_internvl_chat_checkpoint_logits_match(tmp_path, flavour, ps_version):
    hf = hf_model(flavour, image_size=112)
    tensors = write_chat_checkpoint(hf, str(tmp_path), ps_version)
    # The fused qkv rows are [q; k; v] of transformers' separate projections.
    sd = hf.state_dict()
    qkv = tensors["vision_model.encoder.layers.1.attn.qkv.weight"]
    src = "model.vision_tower.encoder.layer.1.attention."
    assert torch.equal(qkv, torch.cat([sd[src + "q_proj.weight"], sd[src + "k_proj.weight"], sd[src + "v_proj.weight"]]))
    assert "mlp1.3.weight" in tensors and "language_model.lm_head.weight" in tensors

    model, info = A.load_pretrained(str(tmp_path), config_overrides={"img_context_token_id": CTX},
                                    output_loading_info=True)
    assert info.format == "internvl_chat" and not info.missing and not info.unexpected
    assert model.config.ps_version == ps_version

    ids, pixels = batch(model.config.num_image_token, 112)
    if ps_version == "v1":
        v2 = hf_logits(hf, ids, pixels)
        hf.model.pixel_shuffle = pixel_shuffle_v1  # transformers implements only v2
    ref = hf_logits(hf, ids, pixels)
    out = engine_logits(model, ids, pixels)
    assert (out - ref).abs().max().item() <= TOL
    if ps_version == "v1":
        assert (v2 - ref).abs().max().item() > 100 * TOL  # the shuffle order matters on these inputs


@pytest.mark.parametrize("preset", ["internvl3-1b", "internvl3-8b", "internvl3-38b", "internvl3-78b", "tiny"])
def test_config_conversion_round_trips_for_presets(preset):
    cfg = preset_model_config(preset)
    hf = InternVLConfig(**A.engine_config_to_hf(cfg))  # transformers accepts and normalises it
    assert A.hf_config_to_engine(hf.to_dict()) == cfg
    assert hf.vision_config.use_qk_norm == cfg.vision.qk_normalization
    assert hf.text_config.rope_parameters["rope_theta"] == cfg.llm.rope_theta
    assert hf.tie_word_embeddings is False and hf.image_seq_length == cfg.num_image_token
    assert A.chat_config_to_engine(A.engine_config_to_chat(cfg)) == cfg


def test_chat_defaults_and_refusals():
    hf = hf_model("300m")
    d = chat_config(hf, "v2")
    cfg = A.chat_config_to_engine(d)
    assert cfg.img_context_token_id == 151667 and cfg.img_start_token_id == 151665  # InternVL3 tokenizer ids
    assert cfg.vision.layer_scale_init == 0.1 and cfg.vision.image_size == 56
    v1 = {k: v for k, v in d.items() if k != "ps_version"}
    assert A.chat_config_to_engine(v1).ps_version == "v1"  # InternVLChatConfig's default
    with pytest.raises(ConfigError, match=r"llm_config.architectures\[0\]='InternLM2ForCausalLM'"):
        A.chat_config_to_engine({**d, "llm_config": {**d["llm_config"], "architectures": ["InternLM2ForCausalLM"]}})
    with pytest.raises(ConfigError, match="force_image_size=448"):
        A.chat_config_to_engine({**d, "force_image_size": 448})


# ----------------------------------------------------------------------------- engine -> files -> engine


def engine_model(preset: str, seed: int = 0, **changes) -> InternVLModel:
    cfg = preset_model_config(preset)
    for k, v in changes.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = InternVLModel(cfg).eval()
    randomize(model, seed)
    return model


def assert_same_tensors(a: InternVLModel, b: InternVLModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset,shard", [("tiny", None), ("tiny-6b-vit", "300KB")])
def test_round_trip_hf_exact_and_loads_in_transformers(tmp_path, preset, shard):
    model = engine_model(preset)
    A.save_pretrained(model, str(tmp_path), format="hf", max_shard_size=shard)
    files = sorted(os.listdir(tmp_path))
    if shard:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
        for f in files:
            if f.endswith(".safetensors"):
                assert os.path.getsize(tmp_path / f) < 300_000 + 64 * 1024  # one tensor may overflow a little
    else:
        assert "model.safetensors" in files

    back = A.load_pretrained(str(tmp_path))
    assert back.config == model.config
    assert_same_tensors(model, back)

    hf, info = InternVLForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.text_config.rope_parameters["rope_theta"] == model.config.llm.rope_theta
    ids, pixels = batch(model.config.num_image_token, 112, vocab=512, ctx=model.config.img_context_token_id)
    assert (hf_logits(hf, ids, pixels) - engine_logits(model, ids, pixels)).abs().max().item() <= TOL


def test_round_trip_chat_exact_keeps_pixel_shuffle_version(tmp_path):
    model = engine_model("tiny-6b-vit", ps_version="v1")
    A.save_pretrained(model, str(tmp_path), format="internvl_chat")
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    C = model.config.vision.hidden_size
    assert "vision_model.encoder.layers.0.attn.qkv.weight" in names
    assert not any("q_proj" in n and n.startswith("vision") for n in names)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("vision_model.encoder.layers.0.attn.qkv.weight").get_shape()) == (3 * C, C)
    back = A.load_pretrained(str(tmp_path))
    assert back.config == model.config and back.config.ps_version == "v1"
    assert_same_tensors(model, back)
    with pytest.raises(ConfigError, match="ps_version='v1'"):
        A.save_pretrained(model, str(tmp_path / "hf"), format="hf")


def test_export_truncates_unused_vit_layers(tmp_path):
    model = engine_model("tiny", select_layer=-2)  # 2 ViT layers in the config, 1 used
    assert len(model.vision_model.layers) == 1
    A.save_pretrained(model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    assert d["vision_config"]["num_hidden_layers"] == 1 and d["vision_feature_layer"] == -1
    back = A.load_pretrained(str(tmp_path))
    assert_same_tensors(model, back)
    ids, pixels = batch(model.config.num_image_token, 112, vocab=512, ctx=model.config.img_context_token_id)
    assert torch.equal(engine_logits(model, ids, pixels), engine_logits(back, ids, pixels))


def test_dtype_overrides_and_pytorch_bin(tmp_path):
    model = engine_model("tiny")
    A.save_pretrained(model, str(tmp_path))
    m = A.load_pretrained(str(tmp_path), dtype="bfloat16", config_overrides={"llm.rope_theta": 5e5})
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.config.llm.rope_theta == 5e5
    with pytest.raises(ConfigError, match="model.llm.no_such_key"):
        A.load_pretrained(str(tmp_path), config_overrides={"llm.no_such_key": 1})

    # The same tensors as a pytorch_model.bin load identically.
    sd = load_file(os.path.join(tmp_path, "model.safetensors"))
    os.remove(os.path.join(tmp_path, "model.safetensors"))
    torch.save(sd, os.path.join(tmp_path, "pytorch_model.bin"))
    assert_same_tensors(model, A.load_pretrained(str(tmp_path)))


# ----------------------------------------------------------------------------- key maps


def test_key_maps_one_tensor_at_a_time():
    qkv = torch.arange(12.0).reshape(6, 2)
    parts = A.map_key("vision_model.encoder.layers.3.attn.qkv.weight", "internvl_chat")
    assert [k for k, _ in parts] == [f"vision_model.layers.3.attn.{p}_proj.weight" for p in "qkv"]
    assert [cut(qkv).tolist() for _, cut in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    assert A.export_key("vision_model.layers.3.attn.k_proj.bias", "internvl_chat") == (
        "vision_model.encoder.layers.3.attn.qkv.bias", 1, 3)
    assert A.map_key("model.language_model.layers.0.self_attn.o_proj.weight")[0][0] == \
        "language_model.layers.0.self_attn.o_proj.weight"
    assert A.map_key("lm_head.weight")[0][0] == "language_model.lm_head.weight"
    assert A.map_key("language_model.model.layers.2.self_attn.rotary_emb.inv_freq") == []
    assert A.export_key("projector.linear_2.bias") == ("multi_modal_projector.linear_2.bias", 0, 1)
    assert A.export_key("projector.layer_norm.weight", "internvl_chat") == ("mlp1.0.weight", 0, 1)
    with pytest.raises(KeyError, match="vision_tower.encoder.layer.0.attention.qkv.weight"):
        A.map_key("vision_tower.encoder.layer.0.attention.qkv.weight")

    # Every engine tensor has a name in both formats, and the maps invert each other.
    cfg = preset_model_config("tiny-6b-vit")
    for fmt in A.FORMATS:
        for name in A.expected_tensors(cfg):
            ckpt, part, _ = A.export_key(name, fmt)
            assert A.map_key(ckpt, fmt)[part][0] == name


# ----------------------------------------------------------------------------- errors


def saved_hf(tmp_path):
    hf_model("300m").save_pretrained(tmp_path)
    return load_file(os.path.join(tmp_path, "model.safetensors"))


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    sd = saved_hf(tmp_path)
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    sd[name] = torch.zeros(48, 32)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(48, 32\).*\(64, 32\)"):
        A.load_pretrained(str(tmp_path))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    sd = saved_hf(tmp_path)
    del sd["vision_tower.encoder.layer.0.lambda_1"]
    sd["vision_tower.encoder.layer.0.attention.extra.weight"] = torch.zeros(2)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(KeyError) as err:
        A.load_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "vision_tower.encoder.layer.0.lambda_1" in msg and "vision_model.layers.0.ls1" in msg
    assert "vision_tower.encoder.layer.0.attention.extra.weight" in msg
    with pytest.warns(UserWarning, match="lambda_1"):
        model, info = A.load_pretrained(str(tmp_path), strict=False, output_loading_info=True)
    assert info.missing == ["vision_model.layers.0.ls1"]
    assert info.unexpected == ["vision_tower.encoder.layer.0.attention.extra.weight"]
    assert torch.equal(model.vision_model.layers[0].ls2, sd["vision_tower.encoder.layer.0.lambda_2"])
