"""A saved EvaClip is a ``local:DIR`` teacher: projected patch tokens, the same as open_clip's teacher gives for
the same weights; an EvaViT directory keeps its unprojected tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import evamim  # noqa: E402
from evamim.clip import ClipConfig, EvaClip, register_timm_trunk, save_clip, save_open_clip  # noqa: E402
from evamim.teachers import CLIP_MEAN, CLIP_STD, check_teacher, create_teacher  # noqa: E402

TEXT = dict(context_length=8, vocab_size=49408, width=32, heads=2, layers=1)
VISION = dict(embed_dim=48, depth=2, num_heads=3, img_size=32, patch_size=8)


def saved_clip(directory, pool: str, seed: int = 0) -> EvaClip:
    model = EvaClip(ClipConfig(vision=VISION, pool=pool, embed_dim=20, text=TEXT)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    save_clip(model, directory)
    return model


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    raw = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@torch.no_grad()
def by_hand(model: EvaClip, x: torch.Tensor) -> torch.Tensor:
    """The last block's patch tokens, the final norm, then the projection: written out, not via the tower."""
    trunk = model.visual.trunk
    tokens, rope, _ = trunk._embed(x, None)
    for block in trunk.blocks:
        tokens = block(tokens, rope)
    patches = tokens[:, 1:]
    # 'token' towers end in `norm`; 'avg' towers normalise in `fc_norm` instead.
    norm = trunk.norm if model.config.pool == "token" else trunk.fc_norm
    patches = F.layer_norm(patches, (patches.shape[-1],), norm.weight, norm.bias, norm.eps)
    return patches @ trunk.head.weight.T + trunk.head.bias


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_clip_directory_targets_are_the_projected_patch_tokens(pool, tmp_path):
    model = saved_clip(tmp_path / "clip", pool)
    teacher = create_teacher(f"local:{tmp_path / 'clip'}")
    assert teacher.embed_dim == 20 and not hasattr(teacher.encoder, "text")
    x = images()
    targets = teacher(x)
    assert targets.shape == (2, 16, 20)
    torch.testing.assert_close(targets, by_hand(model, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets, model.visual.forward_tokens(x), rtol=1e-5, atol=1e-5)


def test_check_teacher_returns_the_projected_width(tmp_path):
    saved_clip(tmp_path / "clip", "token")
    assert check_teacher(f"local:{tmp_path / 'clip'}") == 20
    assert check_teacher(f"local:{tmp_path / 'clip'}", {"layer": 1}) == 20
    with pytest.raises(ValueError, match="layer=2 is out of range for EvaClip model"):
        check_teacher(f"local:{tmp_path / 'clip'}", {"layer": 2})
    vit = evamim.save_pretrained(evamim.create_model("eva_tiny_p16", **VISION), tmp_path / "vit")
    assert check_teacher(f"local:{vit}") == 48  # a plain EvaViT directory: unprojected, as before


def test_intermediate_layer_and_another_grid(tmp_path):
    model = saved_clip(tmp_path / "clip", "token")
    teacher = create_teacher(f"local:{tmp_path / 'clip'}", layer=0)
    x = images()
    with torch.no_grad():
        trunk = model.visual.trunk
        tokens, rope, _ = trunk._embed(x, None)
        expected = trunk.head(trunk.norm(trunk.blocks[0](tokens, rope))[:, 1:])
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    resampled = create_teacher(f"local:{tmp_path / 'clip'}", student_grid=(3, 3))
    assert resampled(images(size=48)).shape == (2, 9, 20)


def test_the_same_targets_as_open_clips_teacher_for_the_same_weights(tmp_path):
    model = saved_clip(tmp_path / "clip", "token")
    save_open_clip(model, tmp_path / "open_clip")
    register_timm_trunk(model.config)
    ours = create_teacher(f"local:{tmp_path / 'clip'}")
    theirs = create_teacher(f"open_clip:local-dir:{tmp_path / 'open_clip'}", dtype="fp32")
    x = images()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
