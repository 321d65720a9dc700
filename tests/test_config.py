"""Config: presets load, overrides coerce, errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ibot_engine.config import ConfigError, all_keys, load_config, save_config
from ibot_engine.configs import CONFIG_DIR

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"
PRESETS = {path.stem: path for path in [*sorted(CONFIG_DIR.glob("*.yaml")), *sorted(CONFIGS.glob("*.yaml"))]}
REQUIRED_KEYS = [
    "run.dir", "train.steps", "train.batch_size", "train.log_every", "train.seed", "model.arch", "model.patch_size",
    "model.out_dim", "data.global_size", "data.local_size", "data.num_local", "data.path", "checkpoint.every",
    "checkpoint.resume", "distributed.strategy", "precision",
]


def test_required_keys_exist():
    keys = set(all_keys())
    assert [k for k in REQUIRED_KEYS if k not in keys] == []


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load(name):
    cfg = load_config(PRESETS[name])
    assert cfg.model.patch_size in (8, 14, 16)


def test_overrides_coerce_to_declared_types():
    cfg = load_config(CONFIGS / "vit_s16.yaml", ["optim.lr=1e-3", "train.steps=10", "data.global_scale=[0.3, 1]",
                                                 "train.compile=true", "precision=fp32"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 10 and cfg.data.global_scale == (0.3, 1.0)
    assert cfg.train.compile is True and cfg.precision == "fp32"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ("trian.steps=3", "unknown config key 'trian.steps'; did you mean 'train.steps'"),
        ("optim.lr=fast", "config key 'optim.lr': expected a number"),
        ("train.batch_size=8.5", "config key 'train.batch_size': expected an integer"),
        ("model.arch=vit_huge", "config key 'model.arch'"),
        ("train.compile=maybe", "config key 'train.compile': expected true or false"),
        ("data.global_size=100", "config key 'data.global_size' = 100 is not a multiple of model.patch_size"),
        ("mask.ratio_max=2", "mask.ratio_max"),
        ("optim.lr", "not of the form key=value"),
        ("train=3", "config key 'train' is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_bad_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  out_dimm: 10\n")
    expected = r"bad.yaml: unknown config key 'model.out_dimm'; did you mean 'model.out_dim'"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "vit_b16.yaml", ["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
