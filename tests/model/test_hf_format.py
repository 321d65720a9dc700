"""Hugging Face folders (ibot_engine.model.hf_format) against transformers' own DINOv2, DINOv2-with-registers and
DINOv3 models: the same tokens from our ViT, folders we write that `AutoModel.from_pretrained` loads strictly, and
one clear error per bad folder.

Every HF model is built at our archs' widths (12 layers) at a small image size, with every weight redrawn (LayerScale,
biases, tokens and LayerNorms away from their inits) so a wrong mapping cannot hide behind a trivial value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ibot_engine.config import ModelConfig
from ibot_engine.model.hf_format import read_hf_folder, write_hf_folder
from ibot_engine.model.vit import VisionTransformer


def _import_transformers():
    """transformers, with Hugging Face's `kernels` package (its dependency) imported first from site-packages.

    pytest (rootdir) and `python -m pytest` (cwd) put the repository root on sys.path, where our kernels/ folder
    (installed as ibot_kernels) would be found as `kernels`, and transformers' import of it fails.
    """
    root = Path(__file__).resolve().parents[2]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        if "kernels" not in sys.modules and importlib.util.find_spec("kernels") is not None:
            importlib.import_module("kernels")  # Hugging Face's, cached in sys.modules for transformers
        return pytest.importorskip("transformers")
    finally:
        sys.path[:] = saved


transformers = _import_transformers()
from transformers.initialization import no_init_weights  # noqa: E402 (after the import above)

TOL = 1e-5  # fp32; both sides run the same ops in a different order (fused vs separate q/k/v projections)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: LayerScale in [0.2, 1], LayerNorm gains near 1, tokens and positions at a scale where
    a misplaced or mis-interpolated one shows, the rest small enough that 12 blocks stay well conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() == 0:
                continue
            if name.endswith(("lambda1", "gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("token", "tokens", "position_embeddings", "pos_embed")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# kind -> (HF config, native image size, other image size (h, w) where HF's scheme can be matched)
CASES = {
    "dinov2": (lambda: transformers.Dinov2Config(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=14, image_size=56), 56, (98, 70)),
    "dinov2_reg": (lambda: transformers.Dinov2WithRegistersConfig(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=14, image_size=56,
        num_register_tokens=4), 56, (98, 70)),
    # DINOv3 ViT-S/16 as released: 4 storage tokens, no K bias, eps 1e-5, RoPE base 100.
    "dinov3": (lambda: transformers.DINOv3ViTConfig(image_size=64, num_register_tokens=4), 64, (96, 48)),
    # DINOv3 ViT-S+/16: SwiGLU (gate/up/down) at width 1536, and a K bias this time.
    "dinov3_swiglu": (lambda: transformers.DINOv3ViTConfig(
        image_size=64, num_register_tokens=4, use_gated_mlp=True, hidden_act="silu", key_bias=True), 64, (48, 80)),
}
_DINOV2 = {"patch_size": 14, "img_size": 56, "pos_embed": "learned", "norm_eps": 1e-6, "ffn": "mlp",
           "qkv_k_bias": True}
_DINOV3 = {"patch_size": 16, "img_size": 64, "num_register_tokens": 4, "pos_embed": "rope", "norm_eps": 1e-5,
           "rope_base": 100.0}
EXPECTED = {
    "dinov2": {**_DINOV2, "arch": "vit_tiny", "num_register_tokens": 0},
    "dinov2_reg": {**_DINOV2, "arch": "vit_tiny", "num_register_tokens": 4},
    "dinov3": {**_DINOV3, "arch": "vit_small", "ffn": "mlp", "qkv_k_bias": False},
    "dinov3_swiglu": {**_DINOV3, "arch": "vit_small_plus", "ffn": "swiglu", "qkv_k_bias": True},
}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each case's randomised HF model (eval mode) and the folder its `save_pretrained` wrote."""
    out = {}
    for i, (kind, (make_config, _, _)) in enumerate(CASES.items()):
        with no_init_weights():  # every weight is redrawn below
            model = transformers.AutoModel.from_config(make_config()).eval()
        _randomise(model, seed=i)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = model, folder
    return out


def _ours(fields: dict, state: dict, **overrides) -> VisionTransformer:
    """Our ViT built from the fields read (a test-side stand-in for the loaders' model_config_for), with a mask
    token when the state has one, loaded strictly. Built on the meta device: its own init would be overwritten."""
    with torch.device("meta"):
        vit = VisionTransformer(**{**fields, **overrides}, mask_token="mask_token" in state)
    vit.load_state_dict(state, strict=True, assign=True)
    return vit.eval()


def _loaded(folder: Path) -> tuple[dict, VisionTransformer]:
    fields, state = read_hf_folder(folder)
    return fields, _ours(fields, state)


def _hf_tokens(model, images, masks=None):
    with torch.no_grad():
        return model(pixel_values=images, bool_masked_pos=masks).last_hidden_state


def _images(h: int, w: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


@pytest.mark.parametrize("kind", list(CASES))
def test_read_gives_hf_tokens_at_the_native_size_with_and_without_masks(kind, hf_folders):
    model, folder = hf_folders[kind]
    fields, vit = _loaded(folder)
    assert {k: fields[k] for k in EXPECTED[kind]} == EXPECTED[kind]
    assert fields["layerscale"] > 0
    size = CASES[kind][1]
    images = _images(size, size)
    with torch.no_grad():
        ours = vit(images)
    theirs = _hf_tokens(model, images)
    assert ours.shape == theirs.shape  # [cls, registers, patches] on both sides
    torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
    # The mask token (HF DINOv3 stores it as [1, 1, D]) replaces the masked patch embeddings on both sides.
    grid = size // fields["patch_size"]
    masks = torch.rand(2, grid, grid, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        ours_masked = vit(images, masks)
    torch.testing.assert_close(ours_masked, _hf_tokens(model, images, masks.flatten(1)), atol=TOL, rtol=0)
    assert (ours_masked - ours).abs().max() > 0.1


@pytest.mark.parametrize("make_config", [
    lambda: transformers.Dinov2Config(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=8,
                                      image_size=32, qkv_bias=False, use_mask_token=False, layer_norm_eps=1e-5),
    lambda: transformers.DINOv3ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768, patch_size=8,
                                         image_size=32, query_bias=False, value_bias=False, proj_bias=False,
                                         mlp_bias=False, rope_theta=50.0),
], ids=["dinov2_no_qkv_bias_no_mask_token", "dinov3_no_biases"])
def test_biases_a_config_turns_off_read_as_zeros(make_config, tmp_path):
    with no_init_weights():
        model = transformers.AutoModel.from_config(make_config()).eval()
    _randomise(model, seed=5)
    model.save_pretrained(tmp_path)
    fields, vit = _loaded(tmp_path)
    assert fields["arch"] == "vit_tiny" and fields["norm_eps"] == 1e-5
    assert fields.get("rope_base", 50.0) == 50.0
    images = _images(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), _hf_tokens(model, images), atol=TOL, rtol=0)


def test_dinov2_at_another_size_matches_our_runtime_resampling(hf_folders):
    """HF's Dinov2Model resamples positions bicubic to the target size without antialias, as our ViT does on the fly
    for a grid other than its stored one."""
    model, folder = hf_folders["dinov2"]
    _, vit = _loaded(folder)
    for h, w in [CASES["dinov2"][2], (42, 42)]:  # upsampled (not square), and downsampled
        images = _images(h, w)
        with torch.no_grad():
            ours = vit(images)
        torch.testing.assert_close(ours, _hf_tokens(model, images), atol=TOL, rtol=0)


def test_dinov2_registers_at_another_size_match_the_load_time_resample(hf_folders):
    """HF's Dinov2WithRegistersModel resamples bicubic with antialias (the official register models do too), as
    `model.init_from` does once at load (read_released -> model_config_for -> fit_state to model.img_size): our ViT
    at that size gives HF's tokens. Our on-the-fly resample (no antialias) does not, even upsampling: PyTorch's
    antialiased bicubic uses another cubic kernel."""
    from ibot_engine.model.released import fit_state, model_config_for, read_released

    model, folder = hf_folders["dinov2_reg"]
    released = read_released(folder)
    assert released.format == "hf"
    _, runtime = _loaded(folder)
    for size in (84, 42):  # up and down; our img_size (the grid positions are stored at) is square
        cfg = model_config_for(released, dataclasses.replace(ModelConfig(), arch="vit_tiny", patch_size=14,
                                                             img_size=size))
        state = {k.removeprefix("backbone."): v for k, v in fit_state(released.student, cfg).items()}
        fields = {f: getattr(cfg, f) for f in EXPECTED["dinov2_reg"]} | {"layerscale": cfg.layerscale}
        vit = _ours(fields, state)
        images = _images(size, size)
        theirs = _hf_tokens(model, images)
        with torch.no_grad():
            torch.testing.assert_close(vit(images), theirs, atol=TOL, rtol=0)
            assert (runtime(images) - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["dinov3", "dinov3_swiglu"])
def test_dinov3_at_other_sizes_matches_hf_rope(kind, hf_folders):
    model, folder = hf_folders[kind]
    _, vit = _loaded(folder)
    for h, w in [CASES[kind][2], (32, 32)]:
        images = _images(h, w)
        with torch.no_grad():
            ours = vit(images)
        torch.testing.assert_close(ours, _hf_tokens(model, images), atol=TOL, rtol=0)


def _strict_from_pretrained(folder: Path):
    model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("kind", list(CASES))
def test_written_folder_loads_strictly_in_transformers_and_reads_back(kind, hf_folders, tmp_path):
    model, folder = hf_folders[kind]
    fields, vit = _loaded(folder)
    out = write_hf_folder(vit.state_dict(), dataclasses.replace(ModelConfig(), **fields), tmp_path / "out")
    loaded = _strict_from_pretrained(out)
    assert type(loaded) is type(model)
    size = CASES[kind][1]
    for h, w in [(size, size), CASES[kind][2]]:
        images = _images(h, w)
        torch.testing.assert_close(_hf_tokens(loaded, images), _hf_tokens(model, images), atol=TOL, rtol=0)
    fields_back, state_back = read_hf_folder(out)
    assert fields_back == fields
    for key, value in vit.state_dict().items():
        assert torch.equal(state_back[key], value), key


@pytest.mark.parametrize("options", [
    {"pos_embed": "learned"},  # a teacher of ours: no LayerScale, no mask token -> Dinov2Model
    {"pos_embed": "rope", "qkv_k_bias": True},  # no registers -> DINOv3ViTModel with an empty register parameter
    {"pos_embed": "rope", "qkv_k_bias": False, "num_register_tokens": 2},
], ids=["learned", "rope_no_registers", "rope_masked_k_bias"])
def test_our_backbones_written_give_our_tokens_in_transformers(options, tmp_path):
    cfg = dataclasses.replace(ModelConfig(), arch="vit_tiny", patch_size=8, img_size=32, layerscale=0.0,
                              norm_eps=1e-5 if options["pos_embed"] == "rope" else 1e-6, **options)
    vit = VisionTransformer(cfg.arch, patch_size=cfg.patch_size, img_size=cfg.img_size, layerscale=cfg.layerscale,
                            num_register_tokens=cfg.num_register_tokens, pos_embed=cfg.pos_embed,
                            rope_base=cfg.rope_base, norm_eps=cfg.norm_eps, qkv_k_bias=cfg.qkv_k_bias).eval()
    _randomise(vit, seed=7)
    loaded = _strict_from_pretrained(write_hf_folder(vit.state_dict(), cfg, tmp_path))
    for h, w in [(32, 32), (48, 40)]:
        images = _images(h, w)
        with torch.no_grad():
            ours = vit(images)
        # At 48 x 40 a learned embedding is resampled without antialias by both.
        torch.testing.assert_close(_hf_tokens(loaded, images), ours, atol=TOL, rtol=0)


def test_transformers_in_memory_key_names_and_shards_read_the_same(hf_folders, tmp_path):
    """A folder may hold transformers 5's in-memory names (attention.q_proj / model.layer.N), which from_pretrained
    also accepts, or shards listed in model.safetensors.index.json."""
    for kind in ("dinov2_reg", "dinov3"):
        model, folder = hf_folders[kind]
        fields, state = read_hf_folder(folder)
        renamed = tmp_path / f"{kind}_renamed"
        renamed.mkdir()
        shutil.copy(folder / "config.json", renamed)
        memory_names = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert set(memory_names) != set(load_file(folder / "model.safetensors"))
        save_file(memory_names, renamed / "model.safetensors", metadata={"format": "pt"})
        sharded = tmp_path / f"{kind}_sharded"
        model.save_pretrained(sharded, max_shard_size="10MB")
        assert not (sharded / "model.safetensors").exists() and (sharded / "model.safetensors.index.json").exists()
        for other in (renamed, sharded):
            fields_other, state_other = read_hf_folder(other)
            assert fields_other == fields and state_other.keys() == state.keys()
            for key in state:
                assert torch.equal(state_other[key], state[key]), (other, key)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_folders_are_one_clear_error_naming_the_folder(hf_folders, tmp_path):
    _, good = hf_folders["dinov2_reg"]

    with pytest.raises(ValueError, match=r"no config\.json"):
        read_hf_folder(tmp_path)

    vit_folder = _copy(good, tmp_path / "vit")
    _edit_config(vit_folder, model_type="vit")
    with pytest.raises(ValueError, match=r"vit/config\.json: model_type 'vit' is not supported.*dinov3_vit"):
        read_hf_folder(vit_folder)

    giant = _copy(good, tmp_path / "giant")
    _edit_config(giant, hidden_size=256, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"giant/config\.json: hidden_size 256, 12 layers, 4 heads.*none of our archs"):
        read_hf_folder(giant)

    pickled = _copy(good, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pickled: no model\.safetensors.*pytorch_model\.bin.*never pickles"):
        read_hf_folder(pickled)

    truncated = _copy(good, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated/model\.safetensors: not a readable safetensors file"):
        read_hf_folder(truncated)

    tensors = load_file(good / "model.safetensors")
    edited = _copy(good, tmp_path / "edited")
    del tensors["encoder.layer.3.attention.attention.key.weight"]
    tensors["classifier.weight"] = torch.zeros(10, 192)
    save_file(tensors, edited / "model.safetensors")
    missing = r"missing keys: encoder\.layer\.3\.attention\.attention\.key\.weight"
    with pytest.raises(ValueError, match=rf"edited: .*{missing}; unknown keys: classifier\.weight"):
        read_hf_folder(edited)


def test_writing_what_hf_cannot_hold_or_a_mismatched_state_is_an_error(tmp_path):
    cfg = dataclasses.replace(ModelConfig(), arch="vit_tiny", patch_size=8, img_size=32, ffn="swiglu")
    vit = VisionTransformer("vit_tiny", patch_size=8, img_size=32, ffn="swiglu")
    with pytest.raises(ValueError, match=r"model\.ffn='swiglu' with learned positions"):
        write_hf_folder(vit.state_dict(), cfg, tmp_path)
    cfg = dataclasses.replace(cfg, ffn="mlp")
    plain = VisionTransformer("vit_tiny", patch_size=8, img_size=32).state_dict()
    state = {f"backbone.{k}": v for k, v in plain.items()}
    with pytest.raises(ValueError, match=r"missing keys: .*unknown keys: backbone\."):
        write_hf_folder(state, cfg, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
