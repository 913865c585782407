"""Objectives on a tiny stand-in student with EvaViT's interface, checked against per-image hand computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evamim.pretrain.objectives import (
    CLIP_MEAN,
    CLIP_STD,
    ObjectiveModule,
    clip_mim,
    feature_distill,
    get_objective,
    list_objectives,
    patchify,
    pixel_mim,
)

PATCH, GRID, DIM = 8, (2, 3), 16


class StandInStudent(nn.Module):
    """EvaViT's interface in miniature: forward_features(images, mask) -> (B, 1 + N, C), lm_head, patch_embed."""

    num_prefix_tokens = 1

    def __init__(self, head_dim: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.patch_embed.patch_size = PATCH
        self.grid_size = GRID
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.mask_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + GRID[0] * GRID[1], DIM) * 0.1)
        self.mixer = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, head_dim)

    def forward_features(self, images, mask=None):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed
        # Token mixing, so that a masked token's prediction depends on the visible ones.
        x = x + self.mixer(x.mean(dim=1, keepdim=True)) + self.mixer(x)
        return self.norm(x)


def _batch(batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=generator)
    masks = torch.zeros(batch_size, GRID[0] * GRID[1], dtype=torch.bool)
    masks[0, [0, 4]] = True  # 2 masked
    masks[1, [1, 2, 3, 5]] = True  # 4 masked
    masks[2, [5]] = True  # 1 masked
    return {"images": images, "masks": masks}


@pytest.fixture
def student():
    torch.manual_seed(0)
    return StandInStudent(head_dim=12)


def _targets(batch, width=12, seed=1):
    batch_size, num_patches = batch["masks"].shape
    return torch.randn(batch_size, num_patches, width, generator=torch.Generator().manual_seed(seed))


def test_clip_mim_matches_per_image_hand_computation(student):
    batch, targets = _batch(), _targets(_batch())
    out = clip_mim(student, batch, targets)
    cosines = []
    for i in range(3):
        tokens = student.forward_features(batch["images"][i : i + 1], mask=batch["masks"][i : i + 1])[0, 1:]
        prediction = student.lm_head(tokens[batch["masks"][i]])
        cosines.append(F.cosine_similarity(prediction, targets[i][batch["masks"][i]], dim=-1))
    cosines = torch.cat(cosines)
    assert cosines.numel() == 7
    torch.testing.assert_close(out["loss"], -cosines.mean())
    torch.testing.assert_close(out["cos_masked"], cosines.mean().detach())
    assert out["num_masked"].item() == 7
    assert out["loss"].dtype == torch.float32 and out["loss"].ndim == 0


def test_clip_mim_gradients_reach_the_student_not_the_targets(student):
    batch, targets = _batch(), _targets(_batch()).requires_grad_(True)
    clip_mim(student, batch, targets)["loss"].backward()
    for name, parameter in student.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert targets.grad is None
    assert not get_objective("clip_mim")(student, batch, targets)["cos_masked"].requires_grad


def test_feature_distill_matches_hand_computation(student):
    batch, targets = _batch(), _targets(_batch())
    out = feature_distill(student, batch, targets)
    prediction = student.lm_head(student.forward_features(batch["images"])[:, 1:])
    expected = F.cosine_similarity(prediction, targets, dim=-1).mean()
    torch.testing.assert_close(out["loss"], -expected)
    out["loss"].backward()
    assert student.mask_token.grad is None  # no masking in feature distillation
    assert student.patch_embed.weight.grad is not None


def test_pixel_mim_matches_hand_computation():
    torch.manual_seed(0)
    student = StandInStudent(head_dim=PATCH * PATCH * 3)
    batch = _batch()
    out = pixel_mim(student, batch, None)
    raw = batch["images"] * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    errors = []
    for i in range(3):
        tokens = student.forward_features(batch["images"][i : i + 1], mask=batch["masks"][i : i + 1])[0, 1:]
        for index in torch.nonzero(batch["masks"][i]).flatten().tolist():
            row, col = divmod(index, GRID[1])
            patch = raw[i, :, row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]
            target = patch.permute(1, 2, 0).reshape(-1)  # (row, col, channel) order, as MAE
            target = (target - target.mean()) / (target.var() + 1e-6) ** 0.5
            errors.append(((student.lm_head(tokens[index]) - target) ** 2).mean())
    torch.testing.assert_close(out["loss"], torch.stack(errors).mean())
    assert out["num_masked"].item() == 7
    raw_pixels = get_objective("pixel_mim", norm_pix=False)(student, batch, None)["loss"]
    assert raw_pixels.item() != pytest.approx(out["loss"].item())


def test_patchify_layout():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(images, 2)
    assert patches.shape == (2, 6, 12)
    # Patch (row 1, col 2) of image 1; pixel (0, 1) of that patch; channel 2.
    assert patches[1, 1 * 3 + 2, (0 * 2 + 1) * 3 + 2] == images[1, 2, 2, 5]


@pytest.mark.parametrize("name", ["clip_mim", "feature_distill", "pixel_mim"])
def test_losses_are_float32_under_bf16_autocast(name):
    torch.manual_seed(0)
    head_dim = PATCH * PATCH * 3 if name == "pixel_mim" else 12
    student = StandInStudent(head_dim=head_dim)
    batch = _batch()
    objective = get_objective(name)
    targets = _targets(batch).to(torch.bfloat16) if objective.needs_teacher else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(student, batch, targets)
    assert out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"])
    out["loss"].backward()


def test_get_objective_and_module():
    assert list_objectives() == ["clip_mae", "clip_mim", "feature_distill", "pixel_mim"]
    with pytest.raises(ValueError, match=r"clip_mim.*feature_distill.*pixel_mim"):
        get_objective("clip")
    with pytest.raises(TypeError, match="no option"):
        get_objective("clip_mim", mean=(0, 0, 0))
    objective = get_objective("clip_mim")
    assert objective.needs_teacher and objective.uses_masks
    assert not get_objective("pixel_mim").needs_teacher and not get_objective("feature_distill").uses_masks
    torch.manual_seed(0)
    module = ObjectiveModule(StandInStudent(head_dim=12), "clip_mim")
    batch = _batch()
    torch.testing.assert_close(module(batch, _targets(batch))["loss"], clip_mim(module.student, batch, _targets(batch))["loss"])


def test_clear_errors(student):
    batch = _batch()
    with pytest.raises(ValueError, match="mim_head_dim=20"):
        clip_mim(student, batch, _targets(batch, width=20))
    with pytest.raises(ValueError, match="student_grid"):
        clip_mim(student, batch, torch.randn(3, 4, 12))
    with pytest.raises(ValueError, match="needs teacher targets"):
        clip_mim(student, batch, None)
    with pytest.raises(TypeError, match="bool"):
        clip_mim(student, {"images": batch["images"], "masks": batch["masks"].long()}, _targets(batch))
