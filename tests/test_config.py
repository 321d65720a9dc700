"""Config: presets load, overrides coerce, errors name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ibot_engine.config import ConfigError, all_keys, config_to_dict, load_config, save_config
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


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.patch_size=8", "data.global_size=64", "data.local_size=32"], (0.2, 0.5)),
        (["model.patch_size=8", "data.global_size=32", "data.local_size=16"], (0.2, 0.5)),
        ([], (0.1469, 0.3673)),  # 224 px global, auto local_size 96
    ],
)
def test_auto_local_scale_resolves_from_the_crop_sizes_and_is_saved_resolved(tmp_path, overrides, expected):
    cfg = load_config(None, [*overrides, "data.local_scale=[0, 0]"])
    assert cfg.data.local_scale == expected
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["local_scale"] == list(expected)
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(None, overrides).data.local_scale == (0.05, 0.25)  # the default stays the official one


RUN_FRACTIONS = ["optim.warmup_epochs=0.1", "optim.freeze_last_layer_epochs=0", "loss.warmup_teacher_temp_epochs=1"]


def test_run_schedule_unit_loads_with_fractions():
    cfg = load_config(None, ["train.schedule_unit=run", "loss.teacher_temp_per_step=true", *RUN_FRACTIONS])
    assert cfg.train.schedule_unit == "run" and cfg.optim.warmup_epochs == 0.1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optim.warmup_epochs=10"], "config key 'optim.warmup_epochs' is a fraction of the run in [0, 1]"),
        (["optim.freeze_last_layer_epochs=1.5"], "config key 'optim.freeze_last_layer_epochs' is a fraction"),
        (["loss.warmup_teacher_temp_epochs=-0.1"], "config key 'loss.warmup_teacher_temp_epochs' is a fraction"),
        (["loss.teacher_temp_per_step=false"],
         "config key 'train.schedule_unit' = run needs loss.teacher_temp_per_step=true"),
        (["data.local_scale=[0, 0.3]"], "config key 'data.local_scale' must satisfy 0 < min <= max <= 1 ([0, 0]: auto"),
    ],
)
def test_bad_schedule_fractions_and_local_scale_name_the_key(overrides, match):
    base = ["train.schedule_unit=run", "loss.teacher_temp_per_step=true", *RUN_FRACTIONS]
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(None, [*base, *overrides])



def test_a_config_builds_on_its_base(tmp_path):
    """`base:` applies another config first: a file next to it, or a packaged recipe by name; the file's own keys and
    the overrides win, in that order."""
    (tmp_path / "general.yaml").write_text("train:\n  steps: 50\n  batch_size: 32\nloss:\n  student_temp: 0.2\n")
    (tmp_path / "mine.yaml").write_text("base: general.yaml\ntrain:\n  steps: 70\n")
    cfg = load_config(tmp_path / "mine.yaml", ["loss.student_temp=0.3"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.loss.student_temp) == (70, 32, 0.3)
    (tmp_path / "packaged.yaml").write_text("base: small_data\ntrain:\n  steps: 70\n")
    cfg = load_config(tmp_path / "packaged.yaml")
    assert cfg.loss.student_temp == 0.25 and cfg.model.layerscale == 0.0 and cfg.train.steps == 70
    assert cfg.data.local_scale == (0.1469, 0.3673)  # the recipe's auto local scale, at the default 224 / 96 px


@pytest.mark.parametrize("text, message", [
    ("base: loop.yaml\n", "comes back to it"),
    ("base: nowhere\n", "neither a file next to it nor a packaged config"),
    ("base: 3\n", "'base' names another config file"),
])
def test_a_bad_base_is_one_clear_error(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "loop.yaml")


def test_the_demo_is_the_small_data_recipe_plus_its_data():
    """demo_cpu.yaml names data, sizes, steps and logging only: every training setting comes from small_data.yaml."""
    from ibot_engine.configs import DEMO_CONFIG, SMALL_DATA_CONFIG

    demo, recipe = config_to_dict(load_config(DEMO_CONFIG)), config_to_dict(load_config(SMALL_DATA_CONFIG))
    for section in ("optim", "loss", "mask"):
        assert demo[section] == recipe[section], section
    assert {k: v for k, v in demo["model"].items() if k != "img_size"} == \
        {k: v for k, v in recipe["model"].items() if k != "img_size"}
