"""MAE-style EVA pre-training (objective clip_mae): the encoder on the visible patches, the decoder, the loss and
its gradients against a per-image reference, the masks it needs, and the encoder's way into fine-tuning."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evamim
from evamim.config import ConfigError, load_config
from evamim.models.vit import EvaViT
from evamim.pretrain.mae import (
    DecoderConfig,
    MaeDecoder,
    MaeStudent,
    add_mask_indices,
    mask_indices,
    sincos_pos_embed,
)
from evamim.pretrain.masking import BlockMasking, RandomMasking
from evamim.pretrain.objectives import get_objective, objective_spec
from evamim.tasks.finetune import FinetuneConfig, run_finetune
from evamim.tasks.pretrain import PretrainConfig, dry_run, run_pretrain, validate
from test_finetune import tiny_overrides as finetune_overrides
from test_pretrain import CrashAtStep, losses
from test_pretrain import teacher_dir  # noqa: F401  (fixture)
from test_pretrain import tiny_overrides as pretrain_overrides

ENCODER = dict(img_size=(32, 48), patch_size=8, embed_dim=32, depth=2, num_heads=2, global_pool="token")


def tiny_student(**encoder_options) -> MaeStudent:
    torch.manual_seed(0)
    encoder = EvaViT(**{**ENCODER, **encoder_options})
    decoder = MaeDecoder(32, encoder.grid_size, 24, DecoderConfig(depth=2, width=16, num_heads=2))
    with torch.no_grad():  # nothing may hide behind a zero: the mask token and biases too
        for parameter in decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return MaeStudent(encoder, decoder)


def reference_prediction(student: MaeStudent, images: torch.Tensor, masks: torch.Tensor) -> list[torch.Tensor]:
    """Image by image, selecting with the boolean mask (no gather, no batched RoPE tables): the encoder runs on
    the cls token and the visible patches at their grid positions; the decoder puts them back among mask tokens.
    Returns each image's (M_i, D) predictions at its masked patches in row-major order."""
    encoder, decoder = student.encoder, student.decoder
    outputs = []
    for image, mask in zip(images, masks):
        tokens = encoder.patch_embed(image[None])
        tokens = torch.cat((encoder.cls_token, tokens), dim=1)
        if encoder.pos_embed is not None:
            tokens = tokens + encoder.pos_embed
        keep = ~mask
        tokens = torch.cat((tokens[:, :1], tokens[:, 1:][:, keep]), dim=1)
        rope = None
        if encoder.rope is not None:
            rope = (encoder.rope.sin[keep], encoder.rope.cos[keep])
        for block in encoder.blocks:
            tokens = block(tokens, rope)
        tokens = decoder.embed(encoder.norm(tokens))
        full = decoder.mask_token[0].repeat(mask.numel(), 1)
        full[keep] = tokens[0, 1:]
        x = torch.cat((tokens[:, :1], full[None]), dim=1) + decoder.pos_embed
        for block in decoder.blocks:
            x = block(x)
        outputs.append(decoder.pred(decoder.norm(x)[0, 1:][mask]))
    return outputs


@pytest.mark.parametrize("options", [{}, {"use_rope": True}, {"use_rope": True, "use_abs_pos_emb": False}],
                         ids=["abs-pos", "abs-pos+rope", "rope-only"])
def test_clip_mae_loss_and_gradients_equal_a_per_image_reference(options):
    student = tiny_student(**options)
    reference = copy.deepcopy(student)
    grid = student.encoder.grid_size
    masks = RandomMasking(grid, mask_ratio=0.75)(3, np.random.default_rng(1))
    images, targets = torch.randn(3, 3, 32, 48), torch.randn(3, grid[0] * grid[1], 24)

    output = get_objective("clip_mae")(student, {"images": images, "masks": masks}, targets)
    output["loss"].backward()

    predictions = reference_prediction(reference, images, masks)
    cosines = torch.cat([F.cosine_similarity(p, t[m], dim=-1) for p, t, m in zip(predictions, targets, masks)])
    expected = -cosines.mean()
    expected.backward()

    assert torch.allclose(output["loss"], expected, atol=1e-6), (output["loss"], expected)
    assert output["num_masked"].item() == masks.sum().item() == 3 * 18
    for (name, got), want in zip(student.named_parameters(), reference.parameters()):
        assert got.grad is not None and torch.allclose(got.grad, want.grad, atol=1e-6), name


def test_visible_indices_given_with_the_batch_are_used_as_computed():
    """The pre-training step adds ``visible``/``masked`` on the CPU; the objective must give the same result."""
    student = tiny_student()
    masks = RandomMasking(student.encoder.grid_size, mask_ratio=0.5)(2, np.random.default_rng(0))
    images, targets = torch.randn(2, 3, 32, 48), torch.randn(2, 24, 24)
    visible, masked = mask_indices(masks)
    prepared = {"masks": masks, "visible": visible, "masked": masked}
    assert add_mask_indices(prepared) is prepared  # the step's prepare adds nothing to a batch that has them
    a = get_objective("clip_mae")(student, {"images": images, "masks": masks}, targets)
    b = get_objective("clip_mae")(student, {"images": images, "masks": masks, "visible": visible, "masked": masked},
                                  targets)
    assert torch.equal(a["loss"], b["loss"])


def test_mask_indices_are_ascending_and_refuse_unequal_counts():
    masks = torch.tensor([[True, False, False, True], [False, True, True, False]])
    visible, masked = mask_indices(masks)
    assert visible.tolist() == [[1, 2], [0, 3]] and masked.tolist() == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="same number of masked patches in every image, got 1 to 2.*masking.kind=random"):
        mask_indices(torch.tensor([[True, False, False], [True, True, False]]))


def test_block_masks_filled_to_the_budget_have_exact_counts_and_keep_their_blocks():
    plain = BlockMasking((8, 8), mask_ratio=0.5, min_num_patches=4)
    filled = BlockMasking((8, 8), mask_ratio=0.5, min_num_patches=4, fill_to_budget=True)
    # One image per call, as the collate step draws them (a fill consumes draws the next image would get).
    a = torch.cat([plain(1, np.random.default_rng(seed)) for seed in range(64)])
    b = torch.cat([filled(1, np.random.default_rng(seed)) for seed in range(64)])
    assert (a.sum(1) < 32).any(), "the test needs block masks that fall short of their budget"
    assert (b.sum(1) == 32).all()
    assert (b | ~a).all(), "filling may only add patches to the blocks drawn"
    assert torch.equal(b[:1], filled(1, np.random.default_rng(0)))


def mae_sincos_reference(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True), as published."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_decoder_position_embedding_is_maes_sincos():
    assert np.allclose(sincos_pos_embed(16, (5, 5)).numpy(), mae_sincos_reference(16, 5), atol=1e-6)
    assert sincos_pos_embed(16, (2, 3)).shape == (7, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed(18, (2, 2))


def test_clip_mae_spec_and_refusals():
    spec = objective_spec("clip_mae")
    assert spec.encoder_decoder and spec.uses_masks and not spec.uses_mask_token and spec.default_masking == "random"
    with pytest.raises(TypeError, match="encoder-decoder student"):
        get_objective("clip_mae")(EvaViT(**ENCODER), {"images": torch.zeros(1, 3, 32, 48),
                                                      "masks": torch.zeros(1, 24, dtype=torch.bool)}, None)


def test_clip_mim_without_boolean_indexing_equals_the_indexed_loss_and_gradients():
    """clip_mim weights the cosine of every token by the mask instead of selecting with features[masks]."""
    torch.manual_seed(0)
    student = EvaViT(**ENCODER, use_mask_token=True, mim_head_dim=24)
    reference = copy.deepcopy(student)
    masks = BlockMasking(student.grid_size, mask_ratio=0.4, min_num_patches=2)(3, np.random.default_rng(0))
    images, targets = torch.randn(3, 3, 32, 48), torch.randn(3, 24, 24)
    output = get_objective("clip_mim")(student, {"images": images, "masks": masks}, targets)
    output["loss"].backward()
    features = reference.forward_features(images, mask=masks)[:, 1:]
    expected = -F.cosine_similarity(reference.lm_head(features[masks]), targets[masks], dim=-1).mean()
    expected.backward()
    assert torch.allclose(output["loss"], expected, atol=1e-6)
    for (name, got), want in zip(student.named_parameters(), reference.parameters()):
        assert torch.allclose(got.grad, want.grad, atol=1e-6), name


# ---------------------------------------------------------------------------------------------- the task
def mae_overrides(teacher_dir: Path, output_dir: Path, steps: int, *extra: str) -> list[str]:
    drop = ("masking.min_num_patches",)
    return [o for o in pretrain_overrides(teacher_dir, output_dir, steps) if not o.startswith(drop)] + [
        "objective=clip_mae", "decoder.depth=1", "decoder.width=32", "decoder.num_heads=2", *extra]


def test_clip_mae_pretrains_resumes_exactly_and_its_encoder_fine_tunes(teacher_dir, tmp_path):  # noqa: F811
    straight = load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "straight", 6))
    summary = run_pretrain(straight)
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 0
    crashed = load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "resumed", 6, "checkpoint.every=3"))
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(crashed, hooks=(CrashAtStep(4),))
    run_pretrain(crashed)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")

    encoder_dir = tmp_path / "straight" / "model"
    encoder = evamim.create_model(pretrained=encoder_dir)
    assert encoder.lm_head is None and encoder.mask_token is None  # the decoder stays behind
    assert not any(key.startswith("decoder") for key in json.loads((encoder_dir / "config.json").read_text()))
    resumed = evamim.create_model(pretrained=tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(value, resumed[key]) for key, value in encoder.state_dict().items())

    overrides = [o for o in finetune_overrides(tmp_path / "finetune", 2) if not o.startswith("model.options")]
    config = load_config(FinetuneConfig, None, overrides + [f"model.pretrained={encoder_dir}",
                                                            "model.options={patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"])
    results = run_finetune(config)  # strict loading: every encoder weight is used
    assert results["steps"] == 2


def test_clip_mae_config_defaults_and_refusals(teacher_dir, tmp_path, capsys):  # noqa: F811
    config = load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "run", 8))
    plan = dry_run(config)
    assert "masking random: RandomMasking(grid=(4, 4), mask_ratio=0.75, num_masked=12)" in plan
    assert "decoder 1 blocks x 32" in plan and "not exported" in plan
    block = load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "run", 8, "masking.kind=block",
                                                            "masking.min_num_patches=2"))
    assert "filled to the budget" in dry_run(block)
    with pytest.raises(ConfigError, match=r"decoder.\* is set but objective clip_mim has no decoder"):
        validate(load_config(PretrainConfig, None, pretrain_overrides(teacher_dir, tmp_path / "x", 8) + ["decoder.depth=2"]))
    with pytest.raises(ConfigError, match="decoder.width .* multiple of decoder.num_heads"):
        validate(load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "x", 8, "decoder.num_heads=3")))
    with pytest.raises(ConfigError, match="decoder.width must be a multiple of 4"):
        validate(load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "x", 8, "decoder.width=30")))


def test_mae_flop_count_matches_torchs_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from evamim.models.flops import mae_forward_flops

    student = tiny_student(use_rope=True)
    masks = RandomMasking(student.encoder.grid_size, mask_ratio=0.75)(1, np.random.default_rng(0))
    visible, masked = mask_indices(masks)
    # The math kernel runs attention as matrix products, which the counter sees (the fused CPU kernel it skips).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        student(torch.randn(1, 3, 32, 48), visible, masked)
    expected = mae_forward_flops(student.encoder.config, 2, 16, 4.0, num_masked=masked.shape[1], output_dim=24)
    assert counter.get_total_flops() == expected


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(teacher_dir, tmp_path):  # noqa: F811
    """loop.compile compiles each block (encoder and decoder) in place: the same losses, the same exported keys."""
    eager = run_pretrain(load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "eager", 6)))
    compiled = run_pretrain(load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "compiled", 6,
                                                                            "loop.compile=true")))
    assert eager["steps"] == compiled["steps"] == 6
    assert np.allclose(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), atol=1e-5)
    a = evamim.create_model(pretrained=tmp_path / "eager" / "model").state_dict()
    b = evamim.create_model(pretrained=tmp_path / "compiled" / "model").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_pretraining_step_adds_the_indices_on_the_cpu(teacher_dir, tmp_path, monkeypatch):  # noqa: F811
    """The indices are computed by the step's ``prepare`` (before the batch moves to the device), never inside
    the objective, where asking how many patches are masked would cost a device sync."""
    import inspect

    import evamim.pretrain.mae as mae

    callers = []
    original = mae.mask_indices

    def recording(masks):
        callers.append(inspect.stack()[1].function)
        return original(masks)

    monkeypatch.setattr(mae, "mask_indices", recording)
    config = load_config(PretrainConfig, None, mae_overrides(teacher_dir, tmp_path / "run", 2, "optim.warmup_steps=1"))
    assert run_pretrain(config)["steps"] == 2
    assert callers == ["add_mask_indices", "add_mask_indices"]


def test_layer_decay_numbers_the_encoder_as_evavit_and_puts_the_decoder_on_top():
    student = tiny_student()
    depth = student.num_layers()
    assert depth == 2
    assert student.layer_id("encoder.patch_embed.proj.weight") == 0
    assert student.layer_id("encoder.blocks.1.mlp.fc1.weight") == 2
    assert student.layer_id("decoder.blocks.0.attn.qkv.weight") == student.layer_id("decoder.pred.bias") == depth + 1
    assert {"encoder.pos_embed", "encoder.cls_token", "decoder.mask_token"} <= student.no_weight_decay()
