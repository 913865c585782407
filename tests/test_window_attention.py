"""ViTDet window attention in EvaViT: the windows, the blocks that stay global, and loading global weights."""

import pytest
import torch

import evamim
from evamim.models.checkpoint import save_pretrained
from evamim.models.vit import EvaViT, EvaViTConfig
from evamim.models.vit_layers import Windows

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)


def _pair_of_models(**options):
    torch.manual_seed(0)
    plain = EvaViT(EvaViTConfig(**TINY, **options)).eval()
    windowed = EvaViT(EvaViTConfig(**TINY, **options, window_size=4, global_blocks=(1,))).eval()
    windowed.load_state_dict(plain.state_dict())
    return plain, windowed


def test_windows_partition_and_merge_are_inverse_and_row_major():
    windows = Windows((4, 6), 2)
    tokens = torch.arange(24.0).reshape(1, 24, 1)
    parts = windows.partition(tokens)
    assert parts.shape == (6, 4, 1)
    # Window 0 is the top-left 2x2 block of the 4x6 grid, window 1 the next one to the right.
    assert parts[0, :, 0].tolist() == [0, 1, 6, 7]
    assert parts[1, :, 0].tolist() == [2, 3, 8, 9]
    assert parts[3, :, 0].tolist() == [12, 13, 18, 19]
    assert torch.equal(windows.merge(parts, 1), tokens)
    with pytest.raises(ValueError, match="cannot be cut into 4x4 windows"):
        Windows((4, 6), 4)


def _reference_windowed(model: EvaViT, images: torch.Tensor) -> torch.Tensor:
    """Without RoPE, a windowed block is the same block run on each window as a separate image."""
    x, _, grid = model._embed(images, None)
    x = x[:, 1:]
    size = model.config.window_size
    for index, block in enumerate(model.blocks):
        if index in model.config.global_blocks:
            x = block(x, None, Windows(grid, grid))  # all patch tokens, no cls token
            continue
        out = torch.empty_like(x)
        rows, cols = grid
        for top in range(0, rows, size):
            for left in range(0, cols, size):
                idx = torch.tensor([(top + r) * cols + left + c for r in range(size) for c in range(size)])
                out[:, idx] = block(x[:, idx], None, Windows((size, size), size))
        x = out
    return x.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)


def test_windowed_blocks_equal_each_window_run_alone():
    _, windowed = _pair_of_models()
    images = torch.randn(2, 3, 32, 32)
    maps = windowed.forward_intermediates(images, [2], intermediates_only=True)[0]
    assert maps.shape == (2, 32, 8, 8)
    torch.testing.assert_close(maps, _reference_windowed(windowed, images), rtol=1e-5, atol=1e-5)


def test_windows_matter_and_global_blocks_mix_them():
    """A change in one window reaches another window's tokens only through a global block."""
    _, windowed = _pair_of_models()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., :16, :16] += 1.0  # the top-left window (4x4 patches of 4 px)
    before, after = (windowed.forward_intermediates(x, [0, 1], intermediates_only=True) for x in (images, changed))
    far = (slice(None), slice(None), slice(4, 8), slice(4, 8))  # the bottom-right window
    assert torch.equal(before[0][far], after[0][far])  # block 0 is windowed
    assert not torch.allclose(before[1][far], after[1][far])  # block 1 is global


@pytest.mark.parametrize("rope", [False, True])
def test_one_window_over_the_whole_grid_is_global_attention(rope):
    """With the window as large as the grid, every block attends over all patches: the same maps as the model
    whose blocks are all global (RoPE: the window's tables are the grid's)."""
    options = dict(use_rope=True, use_abs_pos_emb=False, rope_ref_grid=(4, 4)) if rope else {}
    torch.manual_seed(0)
    whole = EvaViT(EvaViTConfig(**TINY, **options, window_size=8)).eval()
    all_global = EvaViT(EvaViTConfig(**TINY, **options, window_size=8, global_blocks=(0, 1, 2))).eval()
    all_global.load_state_dict(whole.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(whole.forward_intermediates(images, 1, intermediates_only=True)[0],
                               all_global.forward_intermediates(images, 1, intermediates_only=True)[0])


def test_windowed_rope_uses_one_windows_tables():
    """EVA-02's detection backbone: window blocks rotate by the position inside the window, scaled to the
    reference grid, so the same content in two windows gives the same output when no global block mixes them."""
    torch.manual_seed(0)
    model = EvaViT(EvaViTConfig(**TINY, use_rope=True, use_abs_pos_emb=False, rope_ref_grid=(4, 4),
                                window_size=4)).eval()
    tile = torch.randn(1, 3, 16, 16)
    images = tile.repeat(1, 1, 2, 2)
    maps = model.forward_intermediates(images, 1, intermediates_only=True)[0]
    torch.testing.assert_close(maps[..., :4, :4], maps[..., 4:, 4:])


def test_global_weights_load_into_the_windowed_model_unchanged(tmp_path):
    """A checkpoint of a global-attention model loads strictly (no missing, no unexpected tensor) into the
    windowed one, at another input size; every block's weights are those of the file."""
    torch.manual_seed(0)
    trained = EvaViT(EvaViTConfig(**TINY))
    save_pretrained(trained, tmp_path / "model")
    windowed = evamim.create_model(pretrained=str(tmp_path / "model"), img_size=64, window_size=4,
                                   global_blocks=[2])
    assert windowed.config.window_size == 4 and windowed.grid_size == (16, 16)
    source = trained.state_dict()
    for name, tensor in windowed.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(tensor, source[name]), name
    assert windowed.pos_embed.shape == (1, 1 + 16 * 16, 32)  # resampled from 8x8
    maps = windowed.forward_intermediates(torch.randn(1, 3, 64, 64), 1, intermediates_only=True)
    assert maps[0].shape == (1, 32, 16, 16)


def test_window_options_are_checked():
    with pytest.raises(ValueError, match="not a multiple of window_size 3"):
        EvaViTConfig(**TINY, window_size=3)
    with pytest.raises(ValueError, match=r"global_blocks \[5\] out of range for depth 3"):
        EvaViTConfig(**TINY, window_size=4, global_blocks=(5,))
    with pytest.raises(ValueError, match="only apply with window attention"):
        EvaViTConfig(**TINY, global_blocks=(1,))
    _, windowed = _pair_of_models()
    with pytest.raises(ValueError, match="forward_features needs global attention"):
        windowed(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="return_prefix_tokens needs global attention"):
        windowed.forward_intermediates(torch.randn(1, 3, 32, 32), 1, return_prefix_tokens=True)
