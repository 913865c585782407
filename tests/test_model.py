"""EvaViT behaviour: sizes, FLOPs, masking, gradients, init, presets."""

import math

import pytest
import torch

import evamim
from evamim.models.flops import count_parameters, forward_flops
from evamim.models.presets import model_config
from evamim.models.resample import set_input_size
from evamim.models.vit import EvaViT, EvaViTConfig

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32, patch_size=8)


def test_eva_giant_mim_has_the_paper_parameter_count():
    model = evamim.create_model(
        "eva_giant_p14", mim_head_dim=768, use_mask_token=True, global_pool="token", device="meta"
    )
    assert count_parameters(model) == 1_012_229_632
    assert model.config.mlp_hidden_dim == 6144
    assert model.pos_embed.shape == (1, 257, 1408)
    assert model.blocks[0].attn.qkv.weight.shape == (4224, 1408)


def test_eva_giant_forward_flops_match_published_gmacs():
    macs = forward_flops(model_config("eva_giant_p14")) / 2
    assert abs(macs / 267.2e9 - 1) < 0.01, macs


@pytest.mark.parametrize("name", evamim.list_models())
def test_every_preset_builds_on_meta(name):
    model = evamim.create_model(name, device="meta")
    assert model.config.embed_dim % model.config.num_heads == 0
    if name.startswith("eva02"):
        assert model.config.use_rope and model.config.swiglu
    if name == "eva02_large_p14":
        assert model.config.mlp_hidden_dim == 2730  # int() truncation of 8/3 * 1024, as EVA-02 does


def test_mask_token_replaces_masked_patches():
    """Masked outputs must not depend on the pixels under the mask, and the mask token must get gradient."""
    torch.manual_seed(0)
    model = EvaViT(EvaViTConfig(**TINY, use_mask_token=True, global_pool="token")).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 7:] = True
    altered = images.clone()
    altered[0, :, :8, :] += 5.0  # patches 0-3 of image 0 (all masked)
    altered[1, :, 24:, :] -= 3.0  # patches 12-15 of image 1 (all masked)
    out, out_altered = model.forward_features(images, mask), model.forward_features(altered, mask)
    torch.testing.assert_close(out, out_altered)
    unmasked = model.forward_features(altered)
    assert not torch.allclose(unmasked, model.forward_features(images))
    out.sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_mask_errors_are_explicit():
    model = EvaViT(EvaViTConfig(**TINY))
    with pytest.raises(ValueError, match="use_mask_token=True"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))
    model = EvaViT(EvaViTConfig(**TINY, use_mask_token=True))
    with pytest.raises(ValueError, match="mask shape"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 15, dtype=torch.bool))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(use_rope=True, swiglu=True, sub_ln_mlp=True, sub_ln_attn=True, layer_scale_init=0.1)],
    ids=["eva01", "eva02"],
)
def test_every_parameter_gets_a_gradient(options):
    model = EvaViT(EvaViTConfig(**TINY, **options, use_mask_token=True, mim_head_dim=16, num_classes=4,
                                global_pool="avg", use_fc_norm=True))
    model.norm = torch.nn.LayerNorm(32)  # exercise both norms in one graph
    images = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    mask[:, 0] = True
    features = model.norm(model.forward_features(images, mask))
    loss = model.lm_head(features[:, 1:][mask]).square().mean() + model.forward_head(features).square().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    config = EvaViTConfig(**TINY, use_rope=True, drop_path_rate=0.0)
    plain = EvaViT(config)
    checkpointed = EvaViT(EvaViTConfig(**{**config.to_dict(), "grad_checkpointing": True}))
    checkpointed.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 32, 32)
    plain(images).sum().backward()
    checkpointed(images).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_init_follows_eva():
    torch.manual_seed(0)
    model = EvaViT(EvaViTConfig(embed_dim=256, depth=4, num_heads=4, img_size=32, patch_size=8, num_classes=10))
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert abs(qkv_std - 0.015) < 0.001
    for layer_id, block in enumerate(model.blocks, start=1):
        expected = 0.015 / math.sqrt(2 * layer_id)
        assert abs(block.mlp.fc2.weight.std().item() / expected - 1) < 0.05
        assert abs(block.attn.proj.weight.std().item() / expected - 1) < 0.05
    assert abs(model.head.weight.std().item() / (0.015 * 0.001) - 1) < 0.1  # head init scale 0.001
    assert torch.all(model.blocks[0].attn.q_bias == 0) and torch.all(model.blocks[0].attn.k_bias == 0)


def test_drop_path_is_linearly_spaced_and_inactive_in_eval():
    model = EvaViT(EvaViTConfig(**{**TINY, "depth": 5}, drop_path_rate=0.4))
    assert [round(b.drop_path_rate, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), model(images))


def test_layer_ids_and_no_weight_decay():
    model = EvaViT(EvaViTConfig(**TINY, use_mask_token=True, mim_head_dim=8))
    assert model.layer_id("cls_token") == model.layer_id("pos_embed") == model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("mask_token") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("blocks.2.mlp.fc2.bias") == 3
    assert model.layer_id("fc_norm.weight") == model.layer_id("lm_head.weight") == 4
    assert model.num_layers() == 3
    assert {"pos_embed", "cls_token", "mask_token"} <= model.no_weight_decay()


def test_set_input_size_resamples_and_persists(tmp_path):
    model = EvaViT(EvaViTConfig(**TINY, use_rope=True))
    set_input_size(model, 48)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    evamim.save_pretrained(model, tmp_path / "m")
    reloaded = evamim.create_model(pretrained=tmp_path / "m")
    assert reloaded.config.img_size == (48, 48)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="valid keys"):
        EvaViTConfig.from_dict({"embed_dim": 32, "emb_dim": 3})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        EvaViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="unknown model"):
        evamim.create_model("eva_huge_p14")
    with pytest.raises(ValueError, match="global_pool"):
        EvaViTConfig(global_pool="max")
