import pytest

from engine.config import ConfigError, load_config, validate_config
from engine.models.presets import PRESETS, analytic_param_count, preset_model_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: tiny\ntrain:\n  steps: 7\n")
    cfg = load_config(str(p), ["train.lr=0.5", "parallel.llm.sp=true", "parallel.llm.tp=2", "run.dir=/x/y"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.parallel.llm.sp is True
    assert cfg.model.llm.hidden_size == PRESETS["tiny"].llm.hidden_size
    assert cfg.run_dir == "/x/y"


def test_yaml_model_keys_override_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: internvl3-8b\n  llm:\n    num_layers: 2\n")
    cfg = load_config(str(p))
    assert cfg.model.llm.num_layers == 2 and cfg.model.llm.hidden_size == 3584


@pytest.mark.parametrize("override,needle", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("train.steps=abc", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("data.loss_reduction=mean", "data.loss_reduction"),
    ("parallel.llm.tp=3", "parallel.llm.tp=3"),
    ("parallel.llm.vpp=2", "parallel.llm.vpp=2"),
    ("kernels.rotary=fast", "kernels.rotary"),
    ("parallel.llm.sp=maybe", "parallel.llm.sp"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_world_size_rules():
    cfg = load_config(None, ["parallel.llm.tp=2", "parallel.llm.pp=2", "parallel.llm.microbatches=2",
                             "train.global_batch=8"])
    validate_config(cfg, 4)
    validate_config(cfg, 8)
    with pytest.raises(ConfigError, match="world size 6"):
        validate_config(cfg, 6)
    cfg.train.global_batch = 6
    with pytest.raises(ConfigError, match="train.global_batch=6"):
        validate_config(cfg, 8)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="model.preset"):
        preset_model_config("internvl3-3b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_counts_match_model(name):
    import torch

    from engine.models.internvl import InternVLModel

    cfg = preset_model_config(name)
    with torch.device("meta"):
        model = InternVLModel(cfg, init=False)
    assert sum(p.numel() for p in model.parameters()) == analytic_param_count(cfg)["total"]


def test_known_sizes():
    # InternVL3-78B: ~78.4B parameters (InternViT-6B + Qwen2.5-72B + projector)
    total = analytic_param_count(preset_model_config("internvl3-78b"))["total"]
    assert 78.0e9 < total < 79.0e9
    assert 0.9e9 < analytic_param_count(preset_model_config("internvl3-1b"))["total"] < 1.0e9
