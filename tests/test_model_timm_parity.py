"""EvaViT must compute exactly what timm's Eva computes, for every architecture option."""

import pytest
import torch

import evamim
from evamim.models.checkpoint import load_weights, timm_model_kwargs, to_timm_state_dict
from evamim.models.vit import EvaViT, EvaViTConfig

timm_eva = pytest.importorskip("timm.models.eva")

TINY = dict(embed_dim=48, depth=3, num_heads=3, img_size=32, patch_size=8, init_std=0.02)

CASES = {
    "eva01_avg": dict(TINY),
    "eva01_token": dict(TINY, global_pool="token", num_classes=5),
    "eva01_patch14_nondefault_res": dict(TINY, patch_size=14, img_size=(42, 56)),
    "eva01_giant_mlp_ratio": dict(TINY, mlp_ratio=6144 / 1408, num_classes=7),
    "rope": dict(TINY, use_rope=True, embed_dim=64, num_heads=2),
    "rope_ref_grid": dict(TINY, use_rope=True, embed_dim=64, num_heads=2, rope_ref_grid=(16, 16)),
    "swiglu_packed": dict(TINY, swiglu=True, mlp_ratio=8 / 3),
    "eva02_full": dict(
        TINY, use_rope=True, embed_dim=64, num_heads=4, swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True,
        sub_ln_attn=True, rope_ref_grid=(16, 16), patch_size=14, img_size=56,
    ),
    "layer_scale": dict(TINY, layer_scale_init=0.1, num_classes=3),
    "no_qkv_bias": dict(TINY, qkv_bias=False),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (zero biases and unit norms would hide naming bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _pair(config_kwargs: dict, seed: int = 0):
    model = EvaViT(EvaViTConfig(**config_kwargs)).eval()
    _randomize(model, seed)
    reference = timm_eva.Eva(**timm_model_kwargs(model.config)).eval()
    reference.load_state_dict(to_timm_state_dict(model), strict=True)
    return model, reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_timm(case):
    model, reference = _pair(CASES[case])
    height, width = model.config.img_size
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_features, theirs_features = model.forward_features(images), reference.forward_features(images)
        torch.testing.assert_close(ours_features, theirs_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model.forward_head(ours_features, pre_logits=True),
            reference.forward_head(theirs_features, pre_logits=True),
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("case", ["eva01_avg", "eva02_full"])
def test_intermediates_match_timm(case):
    model, reference = _pair(CASES[case])
    height, width = model.config.img_size
    images = torch.randn(2, 3, height, width)
    for indices, fmt, norm in ((2, "NCHW", False), ([0, -1], "NLC", True)):
        with torch.no_grad():
            ours_final, ours = model.forward_intermediates(images, indices, output_fmt=fmt, norm=norm,
                                                           return_prefix_tokens=True)
            theirs_final, theirs = reference.forward_intermediates(images, indices, output_fmt=fmt, norm=norm,
                                                                   return_prefix_tokens=True)
        torch.testing.assert_close(ours_final, theirs_final, atol=1e-5, rtol=1e-5)
        assert len(ours) == len(theirs) == 2
        for (spatial, prefix), (ref_spatial, ref_prefix) in zip(ours, theirs):
            torch.testing.assert_close(spatial, ref_spatial, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prefix, ref_prefix, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["eva01_avg", "rope_ref_grid"])
def test_dynamic_img_size_matches_timm(case):
    """A model built at one size runs at another, resampling pos_embed and RoPE like timm does.

    timm antialiases pos_embed resampling; PyTorch's antialiased bicubic uses a different kernel even when
    upsampling, so parity needs pos_embed_antialias=True (the default, False, follows the official EVA code).
    """
    model, reference = _pair(dict(CASES[case], dynamic_img_size=True, pos_embed_antialias=True))
    images = torch.randn(2, 3, 48, 64)  # 6x8 grid for a model built for 4x4
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_timm_state_dict_loads_back_into_evamim():
    """timm -> evamim: a timm Eva with separate q/k/v projections and split SwiGLU loads and matches."""
    kwargs = CASES["eva02_full"]
    config = EvaViTConfig(**kwargs)
    reference = timm_eva.Eva(**dict(timm_model_kwargs(config), qkv_fused=False)).eval()
    _randomize(reference, 3)
    model = EvaViT(config).eval()
    report = load_weights(model, reference.state_dict(), strict=True)
    assert report.ok, str(report)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_fixed_size_model_rejects_other_sizes_with_a_hint():
    model = EvaViT(EvaViTConfig(**TINY))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 30, 32))


def test_public_api_names():
    assert "eva_giant_p14" in evamim.list_models()
    assert evamim.list_models("eva02_*") == ["eva02_base_p14", "eva02_large_p14", "eva02_small_p14", "eva02_tiny_p14"]


# ------------------------------------------------------------------------------------------ post-norm blocks
def test_post_norm_blocks_match_timm_eva_block_post_norm():
    """EVA02-E's post-norm blocks: timm's own EvaBlockPostNorm (use_post_norm=True) at tiny dims."""
    model, reference = _pair(dict(TINY, post_norm=True, global_pool="token", num_classes=3))
    assert isinstance(reference.blocks[0], timm_eva.EvaBlockPostNorm)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)
        pre_norm = EvaViT(EvaViTConfig(**dict(TINY, global_pool="token", num_classes=3))).eval()
        pre_norm.load_state_dict(model.state_dict())
        assert (pre_norm(images) - reference(images)).abs().max() > 1e-2  # the block type really matters


# ------------------------------------------------------------------------- export into stock architectures
STOCK = {
    # timm registration -> the evamim preset with the same architecture
    "eva02_base_patch14_224": "eva02_base_p14",  # separate q/k/v, split SwiGLU with sub-LN, RoPE ref 16
    "eva02_tiny_patch14_224": "eva02_tiny_p14",  # fused qkv, packed SwiGLU, RoPE ref 16
    "eva_giant_patch14_224": "eva_giant_p14",  # EVA-01: fused qkv, GELU, MLP 6144/1408
}
TINY_SHAPE = dict(img_size=56, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize("timm_name", sorted(STOCK))
def test_export_loads_strictly_into_stock_timm_models(timm_name):
    """Only the size is given to timm: everything else is the stock registration's (qkv_fused, SwiGLU, RoPE)."""
    import timm

    config = evamim.models.presets.model_config(STOCK[timm_name], **TINY_SHAPE, dynamic_img_size=True,
                                                pos_embed_antialias=True)
    model = EvaViT(config).eval()
    _randomize(model, 4)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                                  **TINY_SHAPE).eval()
    reference.load_state_dict(to_timm_state_dict(model), strict=True)
    assert timm_model_kwargs(config)["qkv_fused"] == (reference.blocks[0].attn.qkv is not None)
    for size in (56, 84):  # native, and another resolution through dynamic_img_size
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            torch.testing.assert_close(model(images), reference(images), atol=1e-5, rtol=1e-5)


def test_export_of_a_resize_timm_cannot_reproduce_is_refused_unless_allowed():
    config = EvaViTConfig(**dict(TINY, dynamic_img_size=True))  # pos_embed_antialias=False: official EVA
    with pytest.raises(ValueError, match="always antialiases"):
        timm_model_kwargs(config)
    assert timm_model_kwargs(config, allow_resize_difference=True)["dynamic_img_size"]
    assert not timm_model_kwargs(EvaViTConfig(**TINY))["dynamic_img_size"]  # fixed size: nothing to resample
    with pytest.raises(ValueError, match="LayerNorm eps"):
        timm_model_kwargs(EvaViTConfig(**dict(TINY, norm_eps=1e-5)))


def test_open_clip_export_loads_strictly_into_open_clip_eva_tower(monkeypatch):
    """open_clip's EVA02-B-16 vision tower (TimmModel over timm's eva02_base_patch16_clip_224, token pool, the
    trunk's head as the CLIP projection), built at tiny dims: strict load, same outputs, and back again."""
    import timm
    from open_clip.timm_model import TimmModel

    shape = dict(img_size=32, embed_dim=64, depth=2, num_heads=4)
    stock_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: stock_create(name, **kwargs, **shape))
    tower = TimmModel("eva02_base_patch16_clip_224", embed_dim=24, image_size=32, pool="token", proj=None).eval()
    config = EvaViTConfig(**shape, patch_size=16, swiglu=True, mlp_ratio=8 / 3, sub_ln_mlp=True, sub_ln_attn=True,
                          use_rope=True, rope_ref_grid=(16, 16), global_pool="token", num_classes=24)
    model = EvaViT(config).eval()
    _randomize(model, 5)
    state = evamim.models.checkpoint.to_open_clip_state_dict(model)
    assert all(key.startswith("visual.trunk.") for key in state)
    tower.load_state_dict({key[len("visual."):]: value for key, value in state.items()}, strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(tower(images), model(images), atol=1e-5, rtol=1e-5)
    back = EvaViT(config)
    assert load_weights(back, state).source_format == "open_clip EVA tower"
